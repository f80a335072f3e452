"""Requests for a sandbox's parts (`/v1/sandboxes/{id}/...`: exec, files, logs,
processes, terminal, snapshots, ...) are served where the sandbox runs: the directory
says whether that is another node, and then the request goes there as it came."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from tartarus.errors import InternalError
from tartarus.server.context import DIRECTORY, FORWARD

SANDBOX_PARTS = "/v1/sandboxes/{id}/"


@web.middleware
async def forwarding_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    resource = request.match_info.route.resource
    if resource is None or not resource.canonical.startswith(SANDBOX_PARTS):
        return await handler(request)
    node = await request.app[DIRECTORY].locate(request.match_info["id"])
    if node is None:
        return await handler(request)
    forward = request.app.get(FORWARD)
    if forward is None:
        raise InternalError(
            f"sandbox {request.match_info['id']} runs on node {node.id}, "
            "and this server cannot forward requests"
        )
    return await forward(request, node)
