"""`tartarus version` and `tartarus completion`."""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.shell_completion import get_completion_class

from tartarus import __version__
from tartarus.api.types import VersionInfo
from tartarus.cli.output import console, emit_json
from tartarus.cli.remote import connect, run_async, url_option
from tartarus.errors import TartarusError


@click.command("version")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option("--client-only", is_flag=True, help="Do not ask (or start) a server.")
@url_option
def version_command(*, as_json: bool, client_only: bool, url: str | None) -> None:
    """Print the client's version and the server's (with its backends)."""
    server: VersionInfo | None = None
    error: str | None = None
    if not client_only:
        try:
            server = _server_version(url)
        except TartarusError as e:
            error = str(e)
    if as_json:
        emit_json({"client": __version__, "server": server, "server_error": error})
        return
    console.print(f"client: tartarus {__version__}", highlight=False)
    if server is not None:
        console.print(f"server: tartarus {server.version} (API {server.api})", highlight=False)
        for name, verdict in sorted(server.backends.items()):
            console.print(f"  {name}: {verdict}", highlight=False)
    elif error is not None:
        console.print(f"server: unreachable ({error})", highlight=False)


@run_async
async def _server_version(url: str | None) -> VersionInfo:
    async with await connect(url) as client:
        return await client.call("GET", "/v1/version", VersionInfo)


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), required=False)
@click.pass_context
def completion_command(ctx: click.Context, shell: str | None) -> None:
    """Print the shell completion script.

    \b
      eval "$(tartarus completion bash)"     # in ~/.bashrc
      tartarus completion fish > ~/.config/fish/completions/tartarus.fish
    """
    shell = shell or Path(os.environ.get("SHELL", "bash")).name
    cls = get_completion_class(shell)
    if cls is None:
        raise click.UsageError(f"no completion for {shell!r}; choose bash, zsh or fish")
    root = ctx.find_root()
    comp = cls(root.command, {}, root.info_name or "tartarus", "_TARTARUS_COMPLETE")
    click.echo(comp.source())
