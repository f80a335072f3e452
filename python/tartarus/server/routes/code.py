"""`POST /v1/sandboxes/{id}/code`: run a cell in the sandbox's Python interpreter."""

from __future__ import annotations

from aiohttp import web

from tartarus.api.types import CodeExecution, RunCodeBody
from tartarus.auth.rbac import SANDBOX_EXEC
from tartarus.node.code_kernel import CodeKernel
from tartarus.node.manager import LiveSandbox
from tartarus.server.context import live_sandbox
from tartarus.server.routing import Reply, RouteTable, read_json, reply

routes = RouteTable()


def kernel_of(live: LiveSandbox) -> CodeKernel:
    kernel = live.attachments.get("kernel")
    if not isinstance(kernel, CodeKernel):
        kernel = CodeKernel(live.sandbox)
        live.attachments["kernel"] = kernel
        live.closers.append(kernel.close)
    return kernel


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/code",
    summary="Run code in the sandbox's interpreter",
    tag="code",
    body=RunCodeBody,
    replies=(Reply(200, CodeExecution),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def run_code(request: web.Request) -> web.StreamResponse:
    """Runs a cell of Python in an interpreter that lives as long as the sandbox, so
    variables, imports and functions persist between calls (like a notebook kernel).
    The value of the last expression comes back as the main result, rendered as text,
    HTML, Markdown, SVG, PNG, JPEG or JSON where the value can; matplotlib figures come
    back as PNG. An exception in the cell is reported in `error`, not as an HTTP error."""
    body = await read_json(request, RunCodeBody)
    kernel = kernel_of(await live_sandbox(request))
    return reply(await kernel.run(body.code, body.timeout_s))
