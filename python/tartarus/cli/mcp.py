"""`tartarus mcp`: serve the Model Context Protocol (Iris) for AI agents."""

from __future__ import annotations

import logging
import sys

import click

from tartarus.cli.output import emit_json, err_console
from tartarus.cli.remote import connect, run_async, url_option


@click.command("mcp")
@click.option(
    "--transport",
    type=click.Choice(["stdio", "http"]),
    default="stdio",
    show_default=True,
    help="stdio: one client on stdin/stdout (what desktop agents launch); http: "
    "streamable HTTP, every request with 'Authorization: Bearer <API key>'.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP: address to bind.")
@click.option(
    "--port", type=int, default=8765, show_default=True, help="HTTP: port (0: a free one)."
)
@url_option
@click.option(
    "--calls-per-minute",
    type=click.IntRange(1),
    default=120,
    show_default=True,
    help="Tool calls one client may start per minute.",
)
@click.option(
    "--max-concurrent-calls",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Tool calls one client may have in flight.",
)
@click.option(
    "--max-sandboxes",
    type=click.IntRange(0),
    default=5,
    show_default=True,
    help="Running sandboxes one client may create through this server.",
)
@click.option("--json", "as_json", is_flag=True, help="HTTP: announce the URL as JSON on stdout.")
@run_async
async def mcp_command(
    *,
    transport: str,
    host: str,
    port: int,
    url: str | None,
    calls_per_minute: int,
    max_concurrent_calls: int,
    max_sandboxes: int,
    as_json: bool,
) -> None:
    """Serve Tartarus's tools to AI agents over the Model Context Protocol: create a
    sandbox, run a command or code, read, write and list files, kill. Each tool call
    uses the caller's credentials (stdio: TARTARUS_API_KEY, else the local owner; HTTP:
    the request's bearer), so the API authorises and audits it; every call, refused
    ones too, is recorded in the audit log."""
    # Heavy (the MCP SDK, pydantic, starlette): imported when the command runs.
    from tartarus.mcp_server.limits import ClientLimits  # noqa: PLC0415
    from tartarus.mcp_server.server import serve_http, serve_stdio  # noqa: PLC0415

    limits = ClientLimits(
        calls_per_minute=calls_per_minute,
        max_concurrent_calls=max_concurrent_calls,
        max_sandboxes=max_sandboxes,
    )
    # stdout is the protocol on stdio: logs go to stderr.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    api = await connect(url)
    try:
        if transport == "stdio":
            await serve_stdio(api, limits)
            return

        def announce(endpoint: str) -> None:
            if as_json:
                emit_json({"url": endpoint})
                sys.stdout.flush()
            else:
                err_console.print(f"MCP (streamable HTTP) on {endpoint}")

        await serve_http(api.endpoint, limits, host=host, port=port, announce=announce)
    finally:
        await api.close()
