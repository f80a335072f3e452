"""`tartarus certs`: the CA and certificates for mTLS between node agents and servers."""

from __future__ import annotations

from pathlib import Path

import click

from tartarus.auth.certs import AGENT_DAYS, SERVER_DAYS, CertError, CertificateAuthority
from tartarus.cli.output import err_console

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where the CA and certificates live.",
)


@click.group("certs")
def certs_group() -> None:
    """A CA and certificates for mTLS (node agents ↔ API servers)."""


def _server_and_agents(
    ca: CertificateAuthority,
    directory: Path,
    servers: tuple[str, ...],
    agents: tuple[str, ...],
    days: int | None,
) -> None:
    if servers:
        ca.issue_server(directory, list(servers), days or SERVER_DAYS)
        err_console.print(f"server certificate for {', '.join(servers)}: {directory}/server.pem")
    for agent in agents:
        ca.issue_agent(directory, agent, days or AGENT_DAYS)
        err_console.print(f"agent certificate for {agent}: {directory}/agents/{agent}.pem")


@certs_group.command("init")
@dir_option
@click.option(
    "--server-name", "servers", multiple=True, help="A DNS name or IP of the server (repeat)."
)
@click.option("--agent", "agents", multiple=True, help="A node agent's name (repeat).")
def init_command(*, directory: Path, servers: tuple[str, ...], agents: tuple[str, ...]) -> None:
    """Create a CA, and certificates for the server and agents.

    Then point the server at them in tartarus.toml:

    \b
        [auth.tls]
        cert = "DIR/server.pem"
        key = "DIR/server.key"
        client_ca = "DIR/ca.pem"
    """
    try:
        ca = CertificateAuthority.create(directory)
        err_console.print(f"CA: {directory}/ca.pem (keep {directory}/ca.key private)")
        _server_and_agents(ca, directory, servers or ("localhost", "127.0.0.1"), agents, None)
    except CertError as e:
        raise click.ClickException(str(e)) from e


@certs_group.command("issue")
@dir_option
@click.option("--server-name", "servers", multiple=True, help="Reissue the server certificate.")
@click.option("--agent", "agents", multiple=True, help="Issue (or reissue) an agent's.")
@click.option("--days", type=click.IntRange(1, 3650), help="Lifetime in days.")
def issue_command(
    *, directory: Path, servers: tuple[str, ...], agents: tuple[str, ...], days: int | None
) -> None:
    """Issue certificates from the existing CA: new agents, or rotation (a running
    server picks up replaced files on its next handshake)."""
    if not servers and not agents:
        raise click.UsageError("give --server-name and/or --agent")
    try:
        _server_and_agents(CertificateAuthority.load(directory), directory, servers, agents, days)
    except CertError as e:
        raise click.ClickException(str(e)) from e
