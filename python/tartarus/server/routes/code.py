"""`/v1/sandboxes/{id}/code`: run cells in the sandbox's interpreters, and the code
contexts that keep their state apart."""

from __future__ import annotations

import contextlib
import math

import anyio
from aiohttp import web

from tartarus.api.types import (
    CodeContextInfo,
    CodeContextList,
    CodeDoneEvent,
    CodeExecution,
    CodeStreamEvent,
    CreateCodeContextBody,
    RunCodeBody,
)
from tartarus.auth.rbac import SANDBOX_EXEC, SANDBOX_READ
from tartarus.node.code_contexts import CodeContexts
from tartarus.node.manager import LiveSandbox
from tartarus.server.context import live_sandbox
from tartarus.server.routing import NDJSON, Reply, RouteTable, encode, read_json, reply

routes = RouteTable()


def contexts_of(live: LiveSandbox) -> CodeContexts:
    contexts = live.attachments.get("code-contexts")
    if not isinstance(contexts, CodeContexts):
        contexts = CodeContexts(live.sandbox, live.workdir)
        live.attachments["code-contexts"] = contexts
        live.closers.append(contexts.close)
    return contexts


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/code",
    summary="Run code in the sandbox's interpreter",
    tag="code",
    body=RunCodeBody,
    replies=(Reply(200, CodeExecution),),
    errors=(404, 409, 422),
    permission=SANDBOX_EXEC,
)
async def run_code(request: web.Request) -> web.StreamResponse:
    """Runs a cell in an interpreter that lives as long as the sandbox, so variables,
    imports and functions persist between calls (like a notebook kernel): Python,
    JavaScript (node) or the shell (bash, else sh), as the template has them.
    `context` picks an interpreter made with `POST .../code/contexts`, else `language`'s
    default one (Python's is `default`). The value of the last expression comes back as the main
    result, rendered as text, HTML, Markdown, SVG, PNG, JPEG or JSON where the value can;
    matplotlib figures come back as PNG. An exception in the cell is reported in
    `error`, not as an HTTP error; a cell past its timeout is interrupted and its context
    keeps its state."""
    body = await read_json(request, RunCodeBody)
    contexts = contexts_of(await live_sandbox(request))
    return reply(
        await contexts.run(
            body.code,
            context=body.context,
            language=body.language,
            timeout_s=body.timeout_s,
            env=body.envs,
        )
    )


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/code/stream",
    summary="Run code and stream its output",
    tag="code",
    body=RunCodeBody,
    replies=(Reply(200, CodeStreamEvent, media=NDJSON, description="NDJSON events"),),
    errors=(404, 409, 422),
    permission=SANDBOX_EXEC,
)
async def run_code_stream(request: web.Request) -> web.StreamResponse:
    """Runs a cell as `POST .../code` does and sends one JSON document per line as it
    runs: `stdout` and `stderr` (each line the cell prints), `result` (each displayed
    value, the main one included), `error`, then `done` with the whole execution. A
    client that goes away does not stop the cell: its context stays consistent."""
    body = await read_json(request, RunCodeBody)
    kernel = contexts_of(await live_sandbox(request)).kernel_for(body.context, body.language)
    line = kernel.request(body.code, body.envs)
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
    await response.prepare(request)
    # Unbounded, yet bounded by the cell's output cap (MAX_CELL_OUTPUT).
    send, receive = anyio.create_memory_object_stream[CodeStreamEvent](math.inf)
    connected = True

    async def run() -> None:
        async with send:
            execution = await kernel.run_request(line, body.timeout_s, on_event=send.send_nowait)
            send.send_nowait(CodeDoneEvent(execution=execution))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        async with receive:
            async for event in receive:
                if not connected:
                    continue  # drained, so the cell ends as it would have
                try:
                    await response.write(encode(event) + b"\n")
                except ConnectionError:
                    connected = False
    if connected:
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    return response


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/code/contexts",
    summary="Create a code context",
    tag="code",
    body=CreateCodeContextBody,
    body_required=False,
    replies=(Reply(201, CodeContextInfo),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def create_code_context(request: web.Request) -> web.StreamResponse:
    """An interpreter of its own, started on its first cell: its variables, imports
    and working directory are not shared with other contexts. At most 16 per sandbox."""
    body = await read_json(request, CreateCodeContextBody)
    contexts = contexts_of(await live_sandbox(request))
    return reply(contexts.create(body.language, body.cwd), status=201)


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/code/contexts",
    summary="List code contexts",
    tag="code",
    replies=(Reply(200, CodeContextList),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def list_code_contexts(request: web.Request) -> web.StreamResponse:
    contexts = contexts_of(await live_sandbox(request))
    return reply(CodeContextList(items=contexts.list()))


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/code/contexts/{context}/restart",
    summary="Restart a code context",
    tag="code",
    replies=(Reply(200, CodeContextInfo),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def restart_code_context(request: web.Request) -> web.StreamResponse:
    """Ends the context's interpreter (its state is gone); the next cell starts a new
    one in the same working directory."""
    contexts = contexts_of(await live_sandbox(request))
    return reply(await contexts.restart(request.match_info["context"]))


@routes.route(
    "DELETE",
    "/v1/sandboxes/{id}/code/contexts/{context}",
    summary="Remove a code context",
    tag="code",
    replies=(Reply(204, description="Removed"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def remove_code_context(request: web.Request) -> web.StreamResponse:
    contexts = contexts_of(await live_sandbox(request))
    await contexts.remove(request.match_info["context"])
    return web.Response(status=204)
