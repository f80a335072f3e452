"""`/v1/sandboxes/{id}/processes`: list, kill, reattach, write stdin, resize."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.types import ProcessEntry, ProcessList, ResizeBody, StdinBody, StreamEvent
from tartarus.auth.rbac import SANDBOX_EXEC, SANDBOX_READ
from tartarus.node.manager import LiveSandbox
from tartarus.runtime.base import Execution
from tartarus.server.context import live_sandbox
from tartarus.server.problems import ApiError
from tartarus.server.routes.exec import send_stream
from tartarus.server.routing import NDJSON, Reply, RouteTable, read_json, read_query, reply
from tartarus.server.streams import exit_info

routes = RouteTable()


def pid_of(request: web.Request) -> int:
    try:
        pid = int(request.match_info["pid"])
    except ValueError:
        raise ApiError(404, "not-found", "a process id is a number") from None
    if not 1 <= pid <= 1 << 22:
        raise ApiError(404, "not-found", f"no process {pid}")
    return pid


def owned_execution(live: LiveSandbox, pid: int) -> Execution:
    execution = live.executions.get(pid)
    if execution is None:
        raise ApiError(
            409,
            "stdin-not-open",
            f"process {pid} is not a running background process started with stdin_open "
            "(or a pty) through this server",
        )
    return execution


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/processes",
    summary="List processes",
    tag="processes",
    replies=(Reply(200, ProcessList),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def list_processes(request: web.Request) -> web.StreamResponse:
    """Commands started in the sandbox, running or recently exited."""
    infos = await (await live_sandbox(request)).sandbox.processes()
    return reply(
        ProcessList(
            items=[
                ProcessEntry(
                    pid=p.pid,
                    argv=p.argv,
                    started_at=p.started_at,
                    running=p.running,
                    pty=p.pty,
                    exit=None if p.exit is None else exit_info(p.exit),
                )
                for p in infos
            ]
        )
    )


class KillQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which signal to send.

    signal: the signal number (default 9, SIGKILL)
    """

    signal: Annotated[int, Meta(ge=1, le=64)] = 9


@routes.route(
    "DELETE",
    "/v1/sandboxes/{id}/processes/{pid}",
    summary="Signal a process",
    tag="processes",
    query=KillQuery,
    replies=(Reply(204, description="Signalled"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def kill_process(request: web.Request) -> web.StreamResponse:
    q = read_query(request, KillQuery)
    await (await live_sandbox(request)).sandbox.kill_process(pid_of(request), q.signal)
    return web.Response(status=204)


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/processes/{pid}/stream",
    summary="Reattach to a process",
    tag="processes",
    replies=(Reply(200, StreamEvent, media=NDJSON, description="NDJSON events"),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def attach_process(request: web.Request) -> web.StreamResponse:
    """Replays the process's buffered output, then follows it until it exits. Leaving
    does not stop the process."""
    live = await live_sandbox(request)
    execution = await live.sandbox.attach(pid_of(request))
    return await send_stream(request, live, execution, kill_on_disconnect=False)


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/processes/{pid}/stdin",
    summary="Write to a process's stdin",
    tag="processes",
    body=StdinBody,
    replies=(Reply(204, description="Written"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def write_stdin(request: web.Request) -> web.StreamResponse:
    """For background processes started with `stdin_open` (or a pty): writes `data`,
    then closes stdin if `eof`."""
    body = await read_json(request, StdinBody)
    execution = owned_execution(await live_sandbox(request), pid_of(request))
    if body.data:
        await execution.write_stdin(body.data.encode())
    if body.eof:
        await execution.close_stdin()
    return web.Response(status=204)


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/processes/{pid}/resize",
    summary="Resize a process's terminal",
    tag="processes",
    body=ResizeBody,
    replies=(Reply(204, description="Resized"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def resize_process(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, ResizeBody)
    execution = owned_execution(await live_sandbox(request), pid_of(request))
    await execution.resize(body.rows, body.cols)
    return web.Response(status=204)
