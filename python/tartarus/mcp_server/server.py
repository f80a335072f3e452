"""Iris, the messenger: Tartarus over the Model Context Protocol (`tartarus mcp`).

An MCP server built on the official `mcp` SDK that is a client of the Tartarus API, like
the SDK. Every tool call goes to the API with the caller's own credentials, so the API
authenticates, authorises, isolates and audits it as it does any request; this server
adds per-client limits (`limits.py`) and records every tool call, done, failed or
refused, in the same audit log (`POST /v1/audit/events`, attributed by the API to the
key that sent it).

- stdio: one client, the user who started it, with `TARTARUS_API_KEY` if set (else the
  local server's owner).
- streamable HTTP: every request needs `Authorization: Bearer <API key or token>`, which
  the API verifies (`/v1/auth/whoami`); one client per principal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.lowlevel
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from tartarus.api.security import ClientEvent, WhoAmI
from tartarus.endpoint import Endpoint
from tartarus.errors import TartarusError
from tartarus.mcp_server import tools
from tartarus.mcp_server.limits import ClientLimits, Limiter, LimitExceededError
from tartarus.sdk.client import Client
from tartarus.sdk.errors import ApiError, AuthenticationError

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long a verified token is trusted before the API is asked again (a revoked key
# stops working within this), and how many callers' connections are kept.
TOKEN_TTL_S = 30.0
MAX_CALLERS = 256
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0


@dataclass
class Caller:
    """Who a tool call is for: `name` keys the limits, `api` carries their credentials."""

    name: str
    api: Client

    @property
    def label(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()[:16]


class Callers:
    """The API client of each bearer token the HTTP server has seen, verified with the
    API and kept for `TOKEN_TTL_S` (at most `MAX_CALLERS`; the oldest goes first)."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._seen: OrderedDict[str, tuple[float, Caller]] = OrderedDict()

    async def verify(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode()).hexdigest()
        seen = self._seen.get(digest)
        if seen is not None and time.monotonic() - seen[0] < TOKEN_TTL_S:
            return seen[1]
        api = Client(self._endpoint, api_key=token)
        try:
            who = await api.call("GET", "/v1/auth/whoami", WhoAmI)
        except AuthenticationError:
            await api.close()
            return None
        except BaseException:
            await api.close()
            raise
        caller = Caller(name=f"{who.tenant}/{who.subject}", api=api)
        self._seen[digest] = (time.monotonic(), caller)
        self._seen.move_to_end(digest)
        if seen is not None:
            await seen[1].api.close()
        while len(self._seen) > MAX_CALLERS:
            _, (_, old) = self._seen.popitem(last=False)
            await old.api.close()
        return caller

    async def close(self) -> None:
        for _, caller in self._seen.values():
            await caller.api.close()
        self._seen.clear()


class ApiTokenVerifier:
    """The MCP SDK's token verifier, answered by the Tartarus API."""

    def __init__(self, callers: Callers) -> None:
        self._callers = callers

    async def verify_token(self, token: str) -> AccessToken | None:
        caller = await self._callers.verify(token)
        if caller is None:
            return None
        return AccessToken(token=token, client_id=caller.name, scopes=[])


class ToolCalls:
    """The tools' shared part: who is calling, their limits, and the audit record."""

    def __init__(
        self, *, limits: ClientLimits, stdio_caller: Caller | None, callers: Callers | None
    ) -> None:
        self.limits = limits
        self.limiter = Limiter(limits)
        self._stdio_caller = stdio_caller
        self._callers = callers

    async def caller(self) -> Caller:
        if self._stdio_caller is not None:
            return self._stdio_caller
        token = get_access_token()
        caller = None
        if token is not None and self._callers is not None:
            caller = await self._callers.verify(token.token)
        if caller is None:
            raise ToolError("not authenticated: send 'Authorization: Bearer <API key>'")
        return caller

    async def audit(
        self,
        caller: Caller,
        tool: str,
        *,
        outcome: str,
        status: int,
        resource: dict[str, str],
        detail: str = "",
    ) -> None:
        event = ClientEvent(
            action=f"mcp.{tool}",
            outcome=outcome,
            status=status,
            resource=resource,
            detail=detail[:1024],
        )
        try:
            await caller.api.call("POST", "/v1/audit/events", json=event)
        except TartarusError as e:
            # The API refused or is gone; the call's own request was audited there.
            log.warning("could not record mcp.%s in the audit log: %s", tool, e)

    async def _check_sandbox_count(self, caller: Caller) -> None:
        running = await tools.running_sandboxes_of(caller.api, caller.label)
        if running >= self.limits.max_sandboxes:
            raise LimitExceededError(
                f"over this client's limit of {self.limits.max_sandboxes} running "
                "sandboxes: kill one first (kill_sandbox)"
            )

    async def call(
        self,
        tool: str,
        run: Callable[[Caller], Awaitable[T]],
        *,
        resource: dict[str, str] | None = None,
        creates_sandbox: bool = False,
    ) -> T:
        """Runs one tool call for its caller within their limits, and audits it."""
        caller = await self.caller()
        where = resource or {}
        try:
            with self.limiter.call(caller.name):
                if creates_sandbox:
                    await self._check_sandbox_count(caller)
                result = await run(caller)
        except LimitExceededError as e:
            await self.audit(
                caller, tool, outcome="denied", status=429, resource=where, detail=str(e)
            )
            raise ToolError(str(e)) from None
        except ApiError as e:
            await self.audit(
                caller, tool, outcome="failed", status=e.status, resource=where, detail=str(e)
            )
            raise ToolError(str(e)) from None
        except TartarusError as e:
            await self.audit(
                caller, tool, outcome="failed", status=0, resource=where, detail=str(e)
            )
            raise ToolError(str(e)) from None
        await self.audit(caller, tool, outcome="allowed", status=200, resource=where)
        return result


SandboxId = Annotated[str, Field(description="The sandbox's id, from create_sandbox.")]
Timeout = Annotated[
    float, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds before the call is stopped.")
]


def build_server(
    calls: ToolCalls, *, auth: AuthSettings | None = None, verifier: Any = None
) -> MCPServer:
    """The MCP server with Tartarus's tools."""
    server: MCPServer = MCPServer(
        name="tartarus",
        instructions=(
            "Run untrusted code in isolated Tartarus sandboxes. Create a sandbox, run "
            "commands or code (python, javascript, bash; variables persist between "
            "run_code calls), read and write its files, and kill it when done."
        ),
        auth=auth,
        token_verifier=verifier,
    )

    @server.tool()
    async def create_sandbox(
        template: Annotated[
            str, Field(description="The template: python (the default), python-ds, node, base.")
        ] = "python",
        timeout_s: Annotated[
            float, Field(gt=0, le=86400, description="Seconds until the sandbox stops.")
        ] = 300.0,
        network: Annotated[bool, Field(description="Give it network (policy permitting).")] = False,
    ) -> dict[str, Any]:
        """Creates and starts a sandbox; returns its id."""
        return await calls.call(
            "create_sandbox",
            lambda c: tools.create_sandbox(
                c.api, c.label, template=template, timeout_s=timeout_s, network=network
            ),
            resource={"template": template},
            creates_sandbox=True,
        )

    @server.tool()
    async def run_command(
        sandbox_id: SandboxId,
        command: Annotated[str, Field(description="A shell command line.")],
        timeout_s: Timeout = DEFAULT_TIMEOUT_S,
        cwd: Annotated[str | None, Field(description="Working directory.")] = None,
    ) -> dict[str, Any]:
        """Runs a shell command in the sandbox; returns its exit code and output."""
        return await calls.call(
            "run_command",
            lambda c: tools.run_command(c.api, sandbox_id, command, timeout_s=timeout_s, cwd=cwd),
            resource={"id": sandbox_id},
        )

    @server.tool()
    async def run_code(
        sandbox_id: SandboxId,
        code: Annotated[str, Field(description="The cell to run.")],
        language: Literal["python", "javascript", "bash"] = "python",
        timeout_s: Timeout = DEFAULT_TIMEOUT_S,
    ) -> list[Any]:
        """Runs code in the sandbox's interpreter for `language`, which keeps its state
        between calls like a notebook; returns the results (charts as images), the
        output and the error, if any."""
        execution = await calls.call(
            "run_code",
            lambda c: tools.run_code(
                c.api, sandbox_id, code, language=language, timeout_s=timeout_s
            ),
            resource={"id": sandbox_id},
        )
        images: list[Any] = [
            Image(data=tools.decode_image(r.png), format="png") for r in execution.results if r.png
        ]
        return [tools.describe_execution(execution), *images]

    @server.tool()
    async def read_file(sandbox_id: SandboxId, path: str) -> str:
        """Reads a text file from the sandbox (up to 1 MiB)."""
        return await calls.call(
            "read_file",
            lambda c: tools.read_file(c.api, sandbox_id, path),
            resource={"id": sandbox_id, "path": path},
        )

    @server.tool()
    async def write_file(sandbox_id: SandboxId, path: str, content: str) -> dict[str, Any]:
        """Writes a text file in the sandbox (parents are made)."""
        return await calls.call(
            "write_file",
            lambda c: tools.write_file(c.api, sandbox_id, path, content),
            resource={"id": sandbox_id, "path": path},
        )

    @server.tool()
    async def list_files(sandbox_id: SandboxId, path: str = "/") -> list[dict[str, Any]]:
        """Lists a directory in the sandbox."""
        return await calls.call(
            "list_files",
            lambda c: tools.list_files(c.api, sandbox_id, path),
            resource={"id": sandbox_id, "path": path},
        )

    @server.tool()
    async def kill_sandbox(sandbox_id: SandboxId) -> dict[str, Any]:
        """Stops the sandbox and frees what it held."""
        return await calls.call(
            "kill_sandbox",
            lambda c: tools.kill_sandbox(c.api, sandbox_id),
            resource={"id": sandbox_id},
        )

    return server


async def serve_stdio(api: Client, limits: ClientLimits) -> None:
    """Serves one client on stdin/stdout with `api`'s credentials."""
    calls = ToolCalls(limits=limits, stdio_caller=Caller(name="stdio", api=api), callers=None)
    await build_server(calls).run_stdio_async()


async def serve_http(
    endpoint: Endpoint,
    limits: ClientLimits,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None],
) -> None:
    """Serves streamable HTTP on HOST:PORT/mcp (port 0: a free one, announced)."""
    import uvicorn  # noqa: PLC0415 - only the HTTP transport needs it

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound}/mcp"
    callers = Callers(endpoint)
    calls = ToolCalls(limits=limits, stdio_caller=None, callers=callers)
    issuer = endpoint.base_url if endpoint.kind != "unix" else url
    # The bearer is a Tartarus API key, checked by the API itself (ApiTokenVerifier):
    # it names no resource (RFC 8707) to check it against.
    auth = AuthSettings(
        issuer_url=issuer,  # type: ignore[arg-type]
        resource_server_url=url,  # type: ignore[arg-type]
        validate_token_resource=False,
    )
    server = build_server(calls, auth=auth, verifier=ApiTokenVerifier(callers))
    app = server.streamable_http_app(streamable_http_path="/mcp", host=host)

    class QuietServer(uvicorn.Server):
        """uvicorn without its own signal handlers: the task below stops it on SIGINT
        and SIGTERM whenever they come (uvicorn's handler re-raised the signal into
        whatever handler was there after a graceful stop: the exit status, and whether
        a traceback was shown, depended on when Ctrl-C came)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    http = QuietServer(uvicorn.Config(app, log_level="warning", lifespan="on"))
    interrupted = False

    async def stop_on_signal(signals: AsyncIterator[int]) -> None:
        nonlocal interrupted
        async for signum in signals:
            interrupted = interrupted or signum == signal.SIGINT
            # A second Ctrl-C stops at once, as uvicorn's own handler does.
            http.force_exit = http.should_exit
            http.should_exit = True

    try:
        # Listening before the URL is out: a Ctrl-C from then on stops uvicorn cleanly.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            # A Ctrl-C that came while the imports above ran has cancelled this task:
            # it ends here, before uvicorn starts (which would log it as a traceback).
            await anyio.lowlevel.checkpoint()
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_on_signal, signals)
                announce(url)
                await http.serve(sockets=[sock])
                tg.cancel_scope.cancel()
    finally:
        await callers.close()
        sock.close()
    if interrupted:
        raise KeyboardInterrupt  # the CLI's Ctrl-C: exit status 130


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
