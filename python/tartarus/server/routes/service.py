"""Health, readiness, version and the OpenAPI document."""

from __future__ import annotations

import platform

from aiohttp import web

from tartarus import __version__
from tartarus.api.types import Health, Readiness, VersionInfo
from tartarus.auth.rbac import AUTHENTICATED
from tartarus.server.context import MANAGER, directory, manager
from tartarus.server.routing import Reply, RouteTable, reply

routes = RouteTable()

OPENAPI = web.AppKey("openapi", bytes)
ACCEPTING = web.AppKey("accepting", list[bool])


@routes.route(
    "GET",
    "/v1/health",
    summary="Liveness",
    tag="service",
    replies=(Reply(200, Health),),
    permission=AUTHENTICATED,
)
async def health(request: web.Request) -> web.StreamResponse:
    """200 while the process serves requests."""
    return reply(Health())


@routes.route(
    "GET",
    "/v1/ready",
    summary="Readiness",
    tag="service",
    replies=(Reply(200, Readiness), Reply(503, Readiness, description="Not ready")),
    permission=AUTHENTICATED,
)
async def ready(request: web.Request) -> web.StreamResponse:
    """200 when the server can create sandboxes: the state database answers and the
    server is not shutting down."""
    checks: dict[str, str] = {}
    try:
        request.app[MANAGER].store.ping()
        checks["state"] = "ok"
    except Exception as e:
        checks["state"] = f"failed: {e}"
    checks["accepting"] = "ok" if request.app[ACCEPTING][0] else "shutting down"
    more, ready = await directory(request).readiness()
    checks.update(more)
    ok = checks["state"] == "ok" and checks["accepting"] == "ok" and ready
    return reply(Readiness(ready=ok, checks=checks), status=200 if ok else 503)


@routes.route(
    "GET",
    "/v1/version",
    summary="Version",
    tag="service",
    replies=(Reply(200, VersionInfo),),
    permission=AUTHENTICATED,
)
async def version(request: web.Request) -> web.StreamResponse:
    backends = await manager(request).provider.describe()
    return reply(
        VersionInfo(version=__version__, python=platform.python_version(), backends=backends)
    )


@routes.route(
    "GET",
    "/v1/openapi.json",
    summary="This API's OpenAPI 3.1 document",
    tag="service",
    replies=(Reply(200, description="The OpenAPI document"),),
    permission=AUTHENTICATED,
)
async def openapi_document(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
