"""`tartarus serve`: the API server with its embedded node agent."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import anyio
import click

from tartarus.cli.output import emit_json
from tartarus.config import load_settings
from tartarus.endpoint import Endpoint
from tartarus.fleet.launch import serve_fleet, serve_host
from tartarus.server.serve import ServeOptions


@click.command("serve")
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path),
    help="Unix socket to listen on [default: RUNTIME_DIR/tartarus.sock].",
)
@click.option("--tcp", metavar="HOST:PORT", help="Also listen on TCP (port 0: pick a free one).")
@click.option(
    "--grace",
    "grace_s",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds sandboxes get to stop on shutdown and at their timeout.",
)
@click.option(
    "--state",
    "state_url",
    envvar="TARTARUS_STATE",
    metavar="URL",
    help="Serve a fleet of node agents from shared state: redis://HOST:PORT/DB (several "
    "API servers side by side) or sqlite:///PATH (one) [env: TARTARUS_STATE].",
)
@click.option("--json", "as_json", is_flag=True, help="Announce the endpoints as JSON on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Log every sandbox event.")
@click.option(
    "--detach", is_flag=True, help="Run in the background (a new session); return at once."
)
@click.option(
    "--leave-sandboxes",
    is_flag=True,
    help="On shutdown, leave gVisor and jail sandboxes running for the next server on "
    "this state directory (an upgrade) instead of stopping them.",
)
def serve_command(
    *,
    socket_path: Path | None,
    tcp: str | None,
    grace_s: float,
    state_url: str | None,
    as_json: bool,
    verbose: bool,
    detach: bool,
    leave_sandboxes: bool,
) -> None:
    """Run the Tartarus API server (sandboxes, exec, files, logs) on this host.

    Listens on a unix socket only the current user can use; with --tcp also on TCP
    (anything but loopback needs TARTARUS_API_KEY). Stops on SIGTERM or Ctrl-C:
    in-flight requests finish, then every sandbox is stopped with its grace period
    (or, with --leave-sandboxes, left running for the next server to take back).
    """
    if detach:
        _detach()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    options = ServeOptions(
        socket=socket_path,
        tcp=tcp,
        api_key=os.environ.get("TARTARUS_API_KEY"),
        grace_s=grace_s,
        leave_sandboxes=leave_sandboxes,
    )

    def announce(endpoints: list[Endpoint]) -> None:
        if as_json:
            emit_json({"endpoints": [e.url for e in endpoints], "pid": os.getpid()})
        else:
            for e in endpoints:
                click.echo(f"tartarus serve: listening on {e.url}", err=True)
        sys.stdout.flush()

    settings = load_settings()
    if state_url:
        anyio.run(lambda: serve_fleet(settings, options, state_url, on_ready=announce))
    else:
        anyio.run(lambda: serve_host(settings, options, on_ready=announce))


def _detach() -> None:
    """Forks: the parent returns (exit 0), the child goes on in a new session."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
