"""`tartarus agent`: a node agent that joins a fleet of API servers and runs its sandboxes."""

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
from tartarus.errors import ConfigError
from tartarus.fleet.join_credentials import JoinCredentials
from tartarus.fleet.launch import AgentConfig, run_agent
from tartarus.runtime.types import Backend
from tartarus.scheduling.nodes import InvalidSpecError, parse_label, parse_taint


@click.command("agent")
@click.option(
    "--join",
    "join",
    multiple=True,
    required=True,
    metavar="URL",
    help="An API server of the fleet (repeat for several; the agent fails over).",
)
@click.option(
    "--token",
    envvar="TARTARUS_JOIN_TOKEN",
    default="",
    help="The fleet's token (the API servers' TARTARUS_API_KEY) [env: TARTARUS_JOIN_TOKEN]; "
    "not needed with --cert.",
)
@click.option(
    "--ca",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TARTARUS_JOIN_CA",
    help="CA of the API servers' TLS certificates (https:// URLs) [env: TARTARUS_JOIN_CA].",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TARTARUS_JOIN_CERT",
    help="This agent's client certificate (`tartarus certs issue --agent NAME`): the agent "
    "joins as that name, without a token [env: TARTARUS_JOIN_CERT].",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TARTARUS_JOIN_KEY",
    help="The client certificate's key [env: TARTARUS_JOIN_KEY].",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    metavar="HOST:PORT",
    help="Where this node's own API listens (API servers forward sandbox requests to it).",
)
@click.option("--advertise", metavar="URL", help="The URL API servers use to reach this node.")
@click.option("--node-id", help="This node's name [default: made once, kept in the state dir].")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="A node label.")
@click.option(
    "--taint", "taints", multiple=True, metavar="KEY[=VALUE][:EFFECT]", help="A node taint."
)
@click.option(
    "--pool",
    default="general",
    show_default=True,
    help="The pool (heat classes route to pools; `quarantine` takes flagged work only).",
)
@click.option("--cpus", type=float, help="vCPUs to offer [default: this host's].")
@click.option("--memory-mib", type=int, help="Memory to offer [default: this host's].")
@click.option("--max-sandboxes", type=int, default=1000, show_default=True)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice([b.value for b in Backend if b is not Backend.AUTO]),
    help="Offer only these backends [default: every one the doctor finds usable].",
)
@click.option("--concurrency", type=int, default=8, show_default=True, help="Creates at once.")
@click.option(
    "--drain-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="On SIGTERM, seconds to let sandboxes finish before they are stopped.",
)
@click.option("--json", "as_json", is_flag=True, help="Announce the endpoints as JSON.")
@click.option("-v", "--verbose", is_flag=True)
def agent_command(
    *,
    join: tuple[str, ...],
    token: str,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    listen: str,
    advertise: str | None,
    node_id: str | None,
    labels: tuple[str, ...],
    taints: tuple[str, ...],
    pool: str,
    cpus: float | None,
    memory_mib: int | None,
    max_sandboxes: int,
    backends: tuple[str, ...],
    concurrency: int,
    drain_timeout: float,
    as_json: bool,
    verbose: bool,
) -> None:
    """Run a node agent (Hecatoncheir) that joins a fleet and runs its sandboxes.

    It registers with an API server started with `tartarus serve --state ...`,
    heartbeats, takes the sandboxes the scheduler gives it, reports their state, and
    serves their exec, files and logs to the API servers. It keeps its sandboxes through
    a network cut. SIGTERM drains it: no new work, running sandboxes get --drain-timeout
    seconds, then it stops them and leaves the fleet.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = AgentConfig(
            join=list(join),
            credentials=JoinCredentials(token=token, ca=ca, cert=cert, key=key),
            listen=listen,
            advertise=advertise,
            node_id=node_id,
            labels=dict(parse_label(label) for label in labels),
            taints=[parse_taint(t) for t in taints],
            pool=pool,
            vcpus=cpus,
            memory_mib=memory_mib,
            max_sandboxes=max_sandboxes,
            backends=[Backend(b) for b in backends],
            concurrency=concurrency,
            drain_timeout_s=drain_timeout,
        )
    except InvalidSpecError as e:
        raise click.UsageError(str(e)) from e
    settings = load_settings()

    def announce(endpoints: list[Endpoint]) -> None:
        if as_json:
            emit_json({"endpoints": [e.url for e in endpoints], "pid": os.getpid()})
        else:
            for e in endpoints:
                click.echo(f"tartarus agent: listening on {e.url}", err=True)
        sys.stdout.flush()

    try:
        anyio.run(lambda: run_agent(settings, config, on_ready=announce))
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
