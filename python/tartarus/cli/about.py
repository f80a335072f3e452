"""`tartarus version` and `tartarus completion`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.shell_completion import get_completion_class

from tartarus import __version__
from tartarus.cli.output import emit_json
from tartarus.cli.remote import connect, run_async, url_option
from tartarus.errors import TartarusError

if TYPE_CHECKING:
    from tartarus.api.types import VersionInfo


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
    # Plain text: the quickest command should not pay for importing rich.
    click.echo(f"client: tartarus {__version__}")
    if server is not None:
        click.echo(f"server: tartarus {server.version} (API {server.api})")
        for name, verdict in sorted(server.backends.items()):
            click.echo(f"  {name}: {verdict}")
    elif error is not None:
        click.echo(f"server: unreachable ({error})")


@run_async
async def _server_version(url: str | None) -> VersionInfo:
    from tartarus.api.types import VersionInfo  # noqa: PLC0415 (only with a server)

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
