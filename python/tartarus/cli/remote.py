"""What every server-facing command shares: the connection, async bridging, exit codes.

Exit codes scripts can rely on (docs/cli.md has the table):

- 0 success; 1 an error Tartarus reported; 2 a usage error (bad flags);
- 3 the sandbox (or file, process) does not exist; 4 it is not running;
- 69 no server or no backend is available; 130 Ctrl-C interrupted the command;
- `run` and `exec` pass the sandboxed command's exit code through; a command killed by
  signal N gives 128+N, a timed-out one 124, and Tartarus's own failure 125.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import anyio
import click

from tartarus.cli.output import err_console
from tartarus.errors import TartarusError
from tartarus.sdk.errors import (
    ApiError,
    ConflictError,
    NotFoundError,
    ServerUnreachableError,
    UnavailableError,
)

if TYPE_CHECKING:
    from tartarus.sdk.client import Client

P = ParamSpec("P")
T = TypeVar("T")

EXIT_ERROR = 1
EXIT_NOT_FOUND = 3
EXIT_NOT_RUNNING = 4
EXIT_UNAVAILABLE = 69
EXIT_TIMED_OUT = 124
EXIT_TARTARUS_FAILED = 125

url_option = click.option(
    "--url",
    envvar="TARTARUS_URL",
    help="Server to use (unix:/path or http://host:port) [env: TARTARUS_URL; default: "
    "the local server, started if needed].",
)


def exit_code_for(error: TartarusError) -> int:
    # A requested backend this host lacks is a 409 (another host may have it), but for
    # the CLI it is what 69 means: no backend can run the sandbox here.
    if isinstance(error, ApiError) and error.type.endswith("/backend-unavailable"):
        return EXIT_UNAVAILABLE
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, ConflictError):
        return EXIT_NOT_RUNNING
    if isinstance(error, ServerUnreachableError | UnavailableError):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def fail(error: TartarusError, *, code: int | None = None) -> NoReturn:
    # One line however long (a path, a URL): the terminal wraps it, copying keeps it whole.
    err_console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
    sys.exit(exit_code_for(error) if code is None else code)


def run_async(
    fn: Callable[P, Awaitable[T]],
) -> Callable[P, T]:
    """Runs an async command body with anyio (`main` turns Tartarus errors into exit
    codes)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        async def main() -> T:
            return await fn(*args, **kwargs)

        return anyio.run(main)

    return wrapper


async def connect(url: str | None) -> Client:
    # The HTTP client (aiohttp) is imported by the commands that talk to a server only.
    from tartarus.sdk.client import Client  # noqa: PLC0415

    return await Client.connect(url)


def signal_exit_code(code: int | None, signal: int | None, timed_out: bool) -> int:
    """The shell's convention for how a command ended."""
    if timed_out:
        return EXIT_TIMED_OUT
    if signal is not None:
        return 128 + signal
    return code if code is not None else EXIT_TARTARUS_FAILED


def parse_pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=what)
        out[key] = value
    return out
