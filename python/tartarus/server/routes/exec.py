"""`POST /v1/sandboxes/{id}/exec`: run a command, collected, streamed, or in the background."""

from __future__ import annotations

import contextlib
import logging

import anyio
import msgspec
from aiohttp import web

from tartarus.api.types import (
    ErrorEvent,
    ExecBody,
    ExecOutcome,
    ProcessStarted,
    StartedEvent,
    StreamEvent,
    StreamExecBody,
)
from tartarus.auth.rbac import SANDBOX_EXEC
from tartarus.node.manager import LiveSandbox
from tartarus.runtime.base import Execution, SandboxError
from tartarus.runtime.types import ExecRequest, PtySize
from tartarus.server.context import live_sandbox, manager
from tartarus.server.problems import ApiError
from tartarus.server.routing import NDJSON, Reply, RouteTable, encode, read_json, reply
from tartarus.server.streams import collect, stream_events

log = logging.getLogger(__name__)

routes = RouteTable()

DISCONNECT_POLL_S = 0.25

# The agent's codes for a command that could not be started as asked.
_CANNOT_START = frozenset({"not_found", "permission_denied", "not_a_directory", "is_a_directory"})


def to_runtime_request(body: StreamExecBody, *, keep_stdin: bool = False) -> ExecRequest:
    shell = body.cmd if isinstance(body.cmd, str) else None
    argv = body.cmd if isinstance(body.cmd, list) else None
    return ExecRequest(
        argv=argv,
        shell=shell,
        env=body.env,
        cwd=body.cwd,
        user=body.user,
        stdin=body.stdin is not None or keep_stdin,
        pty=None if body.pty is None else PtySize(rows=body.pty.rows, cols=body.pty.cols),
        timeout_s=body.timeout_s,
        background=isinstance(body, ExecBody) and body.background,
    )


async def start(live: LiveSandbox, body: StreamExecBody, *, keep_stdin: bool = False) -> Execution:
    """Starts the command and feeds `stdin`, closing it unless `keep_stdin` (the caller
    goes on writing)."""
    request = to_runtime_request(body, keep_stdin=keep_stdin)
    if request.cwd is None and live.workdir != "/":
        request = msgspec.structs.replace(request, cwd=live.workdir)
    try:
        execution = await live.sandbox.exec(request)
    except SandboxError as e:
        # The sandbox exists; what is missing is the program (or cwd) the request
        # names, so a 404 would wrongly say the sandbox is gone.
        if getattr(e, "code", None) in _CANNOT_START:
            raise ApiError(422, "cannot-start", str(e)) from e
        raise
    if body.stdin is not None:
        if body.stdin:
            await execution.write_stdin(body.stdin.encode())
        if not keep_stdin:
            await execution.close_stdin()
    return execution


async def drain_background(live: LiveSandbox, execution: Execution) -> None:
    """Consumes a background process's events (the agent keeps its own replay buffer for
    `.../stream`) and forgets the handle when it exits."""
    try:
        async for _ in execution.events():
            pass
    except Exception:
        log.debug("background process %s in %s ended with an error", execution.pid, live.record.id)
    finally:
        live.executions.pop(execution.pid, None)


async def stream_over(request: web.Request, live: LiveSandbox) -> None:
    """Returns when the client's connection closes or the sandbox stops: a streaming
    handler waiting for output would notice neither by itself."""
    while not live.ended.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        with anyio.move_on_after(DISCONNECT_POLL_S):
            await live.ended.wait()


async def send_stream(
    request: web.Request, live: LiveSandbox, execution: Execution, *, kill_on_disconnect: bool
) -> web.StreamResponse:
    """Writes NDJSON events; a foreground command whose client goes away is killed."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    await response.prepare(request)
    finished = False

    async def pump() -> None:
        nonlocal finished
        await response.write(encode(StartedEvent(pid=execution.pid)) + b"\n")
        try:
            async for event in stream_events(execution):
                await response.write(encode(event) + b"\n")
        except SandboxError as e:
            await response.write(encode(ErrorEvent(detail=str(e))) + b"\n")
        finished = True

    try:
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await stream_over(request, live)
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await pump()
            tg.cancel_scope.cancel()
    except ConnectionError:
        log.debug("client left the stream of pid %s", execution.pid)
    finally:
        if not finished and kill_on_disconnect:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await execution.kill()
    if finished:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    return response


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/exec",
    summary="Run a command",
    tag="exec",
    body=ExecBody,
    replies=(
        Reply(200, ExecOutcome, description="The command finished"),
        Reply(
            202,
            ProcessStarted,
            description="Started in the background",
            provides=(("pid", "/pid"),),
        ),
    ),
    errors=(404, 409, 422),
    permission=SANDBOX_EXEC,
)
async def exec_command(request: web.Request) -> web.StreamResponse:
    """Runs `cmd` (a shell line, or an argv list) in the sandbox and returns its output
    when it exits, or, with `background: true`, its pid at once (follow it with
    `.../processes/{pid}/stream`). A background process runs until it exits or the
    sandbox stops; `stdin_open` is for background processes only."""
    body = await read_json(request, ExecBody)
    live = await live_sandbox(request)
    execution = await start(live, body, keep_stdin=body.background and body.stdin_open)
    if body.background:
        live.executions[execution.pid] = execution
        manager(request).spawn(drain_background, live, execution)
        return reply(ProcessStarted(pid=execution.pid), status=202)
    return reply(await collect(execution))


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/exec/stream",
    summary="Run a command and stream its output",
    tag="exec",
    body=StreamExecBody,
    replies=(Reply(200, StreamEvent, media=NDJSON, description="NDJSON events"),),
    errors=(404, 409, 422),
    permission=SANDBOX_EXEC,
)
async def exec_stream(request: web.Request) -> web.StreamResponse:
    """Runs a command and sends one JSON document per line as things happen: `started`
    (with the pid), `output` (stream and text), then `exit`. The command is killed if the
    client disconnects before it exits."""
    body = await read_json(request, StreamExecBody)
    live = await live_sandbox(request)
    execution = await start(live, body)
    return await send_stream(request, live, execution, kill_on_disconnect=True)
