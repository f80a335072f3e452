"""Interactive exec and PTY over WebSocket.

`GET /v1/sandboxes/{id}/exec/ws`: the client's first (text) frame is a StreamExecBody; with
`pty` set the command gets a terminal. Then:

- client → server: binary frames are stdin; text frames are control messages
  (`{"type": "resize", "rows", "cols"}`, `{"type": "eof"}`, `{"type": "signal", "signal"}`);
- server → client: a text frame `{"type": "started", "pid"}`; binary frames whose first
  byte is the stream (1 stdout, 2 stderr) and the rest its bytes; a last text frame
  `{"type": "exit", "exit": {...}}` (or `{"type": "error", "detail"}`), then close.

`GET /v1/sandboxes/{id}/processes/{pid}/ws` attaches to a running process the same
way (replay, then follow). A command started by `exec/ws` is killed when its socket
closes; an attached one keeps running.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
import msgspec
from aiohttp import WSMsgType, web

from tartarus.api.types import (
    WS_STDERR,
    WS_STDOUT,
    ErrorEvent,
    ExitEvent,
    StartedEvent,
    StreamExecBody,
    WsControl,
    WsEof,
    WsResize,
    WsSignal,
)
from tartarus.auth.rbac import SANDBOX_EXEC
from tartarus.node.manager import LiveSandbox
from tartarus.runtime.base import Execution, SandboxError
from tartarus.runtime.types import OutputChunk
from tartarus.server.context import live_sandbox
from tartarus.server.problems import ApiError, from_exception
from tartarus.server.routes.exec import start
from tartarus.server.routes.processes import pid_of
from tartarus.server.routing import RouteTable, decode_json, encode
from tartarus.server.streams import exit_info

log = logging.getLogger(__name__)

routes = RouteTable()

MAX_WS_MESSAGE = 1 << 20
FIRST_MESSAGE_TIMEOUT_S = 30.0
_controls = msgspec.json.Decoder(WsControl)
_STREAM_BYTE = {"stdout": bytes([WS_STDOUT]), "stderr": bytes([WS_STDERR])}


async def _pump_output(ws: web.WebSocketResponse, execution: Execution) -> None:
    try:
        async for event in execution.events():
            if isinstance(event, OutputChunk):
                await ws.send_bytes(_STREAM_BYTE[event.stream] + event.data)
            else:
                await ws.send_str(encode(ExitEvent(exit=exit_info(event))).decode())
                return
    except SandboxError as e:
        await ws.send_str(encode(ErrorEvent(detail=str(e))).decode())


async def _pump_input(ws: web.WebSocketResponse, execution: Execution | None) -> None:
    """Forwards stdin and control messages; without an execution to write to (an attach to
    a process whose stdin is closed) they are refused."""
    async for msg in ws:
        if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
            break
        if execution is None:
            await ws.send_str(
                encode(ErrorEvent(detail="this process's stdin is not open")).decode()
            )
        elif msg.type == WSMsgType.BINARY:
            await execution.write_stdin(msg.data)
        else:
            try:
                control = _controls.decode(msg.data)
            except msgspec.DecodeError as e:
                await ws.send_str(encode(ErrorEvent(detail=f"bad control message: {e}")).decode())
                continue
            if isinstance(control, WsResize):
                await execution.resize(control.rows, control.cols)
            elif isinstance(control, WsEof):
                await execution.close_stdin()
            elif isinstance(control, WsSignal):
                await execution.kill(control.signal)


async def _serve(
    ws: web.WebSocketResponse,
    live: LiveSandbox,
    execution: Execution,
    *,
    owned: bool,
    control: Execution | None,
) -> None:
    """Pumps `execution`'s output to the socket and the socket's input to `control`.
    An `owned` execution (started by this socket) is killed when the socket goes."""
    finished = False
    if owned:
        live.executions[execution.pid] = execution
    try:
        await ws.send_str(encode(StartedEvent(pid=execution.pid)).decode())
        async with anyio.create_task_group() as tg:

            async def output_then_stop() -> None:
                nonlocal finished
                await _pump_output(ws, execution)
                finished = True
                tg.cancel_scope.cancel()

            async def end_with_sandbox() -> None:
                await live.ended.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(output_then_stop)
            tg.start_soon(end_with_sandbox)
            await _pump_input(ws, control)
            # The client closed its side: stop waiting for output.
            tg.cancel_scope.cancel()
    except (ConnectionError, RuntimeError) as e:
        log.debug("websocket of pid %s ended: %s", execution.pid, e)
    finally:
        if owned:
            live.executions.pop(execution.pid, None)
            if not finished:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await execution.kill()
        with contextlib.suppress(Exception):
            await ws.close()


async def _fail(ws: web.WebSocketResponse, exc: Exception) -> web.WebSocketResponse:
    problem = from_exception(exc)
    detail = problem.detail if problem is not None else "the server failed"
    if problem is None:
        log.exception("websocket exec failed")
    await ws.send_str(encode(ErrorEvent(detail=detail)).decode())
    await ws.close(code=1008 if problem is not None and problem.status < 500 else 1011)
    return ws


async def _first_exec_body(ws: web.WebSocketResponse) -> StreamExecBody:
    try:
        with anyio.fail_after(FIRST_MESSAGE_TIMEOUT_S):
            first = await ws.receive()
    except TimeoutError:
        raise ApiError(408, "timeout", "no exec request within 30 s") from None
    if first.type != WSMsgType.TEXT:
        raise ApiError(400, "invalid-message", "the first message must be an exec request (text)")
    return decode_json(first.data, StreamExecBody, "exec request")


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/exec/ws",
    summary="Interactive exec (WebSocket)",
    tag="exec",
    replies=(),
    websocket=True,
    permission=SANDBOX_EXEC,
)
async def exec_websocket(request: web.Request) -> web.StreamResponse:
    live = await live_sandbox(request)
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=30.0)
    await ws.prepare(request)
    try:
        execution = await start(live, await _first_exec_body(ws), keep_stdin=True)
    except Exception as e:
        return await _fail(ws, e)
    await _serve(ws, live, execution, owned=True, control=execution)
    return ws


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/processes/{pid}/ws",
    summary="Attach to a process (WebSocket)",
    tag="processes",
    replies=(),
    websocket=True,
    permission=SANDBOX_EXEC,
)
async def attach_websocket(request: web.Request) -> web.StreamResponse:
    live = await live_sandbox(request)
    pid = pid_of(request)
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=30.0)
    await ws.prepare(request)
    try:
        execution = await live.sandbox.attach(pid)
    except Exception as e:
        return await _fail(ws, e)
    await _serve(ws, live, execution, owned=False, control=live.executions.get(pid))
    return ws
