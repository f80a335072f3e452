"""Builds the aiohttp application: routes, the problem+json middleware, Cerberus's
access middleware (`tartarus.server.access`) and the forwarding of requests for a
sandbox that runs on another node (`tartarus.server.forwarding`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tartarus.node.directory import LocalDirectory
from tartarus.node.manager import SandboxManager
from tartarus.server import openapi
from tartarus.server.access import access_middleware
from tartarus.server.context import (
    DIRECTORY,
    MANAGER,
    SNAPSHOT_WIRING,
    STARTED_AT,
    activity_middleware,
    add_server_timing,
)
from tartarus.server.forwarding import forwarding_middleware
from tartarus.server.problems import from_exception, problem_response
from tartarus.server.routes import (
    audit,
    code,
    files,
    keys,
    logs,
    policies,
    ports,
    processes,
    sandboxes,
    service,
    snapshots,
    templates,
    terminal,
)
from tartarus.server.routes import exec as exec_routes
from tartarus.server.routes.service import ACCEPTING, OPENAPI
from tartarus.server.routing import MAX_JSON_BODY, Operation, RouteTable
from tartarus.server.security import SECURITY, Security
from tartarus.snapshots.wiring import SnapshotWiring

log = logging.getLogger(__name__)

TABLES: tuple[RouteTable, ...] = (
    service.routes,
    sandboxes.routes,
    exec_routes.routes,
    processes.routes,
    files.routes,
    logs.routes,
    terminal.routes,
    code.routes,
    templates.routes,
    keys.routes,
    policies.routes,
    audit.routes,
    snapshots.routes,
    ports.routes,
)


def operations() -> list[Operation]:
    return [op for table in TABLES for op in table.operations]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        slug = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(
            e.status, "http-error"
        )
        detail = {
            404: f"no such endpoint: {request.method} {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
        }.get(e.status, e.text or e.reason)
        headers = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
        return problem_response(e.status, slug, detail, instance=request.path, headers=headers)
    except ConnectionError:
        # The client went away mid-response: nothing to answer, nothing to log loudly.
        log.debug("client of %s %s disconnected", request.method, request.path)
        raise
    except Exception as e:
        problem = from_exception(e)
        if problem is None:
            log.exception("unhandled error in %s %s", request.method, request.path)
            return problem_response(
                500, "internal", "the server failed; its log has the details", instance=request.path
            )
        return problem_response(
            problem.status,
            problem.slug,
            problem.detail,
            instance=request.path,
            errors=problem.errors,
            headers=problem.headers,
        )


def build_app(
    manager: SandboxManager,
    security: Security,
    *,
    middlewares: Sequence[Middleware] = (),
    tables: Sequence[RouteTable] = (),
    snapshot_wiring: SnapshotWiring | None = None,
) -> web.Application:
    """`middlewares` run after the access check; `tables` add routes (and their OpenAPI).
    The sandbox routes find sandboxes in this host's manager until a plugin puts another
    directory (a fleet's) in `app[DIRECTORY]`."""
    all_tables = (*TABLES, *tables)
    ops = [op for table in all_tables for op in table.operations]
    app = web.Application(
        middlewares=[
            problem_middleware,
            access_middleware(security.authenticator, ops, security.audit),
            forwarding_middleware,
            activity_middleware,
            *middlewares,
        ],
        client_max_size=MAX_JSON_BODY,
    )
    app[MANAGER] = manager
    app[DIRECTORY] = LocalDirectory(manager)
    app[SECURITY] = security
    if snapshot_wiring is not None:
        app[SNAPSHOT_WIRING] = snapshot_wiring
    app[STARTED_AT] = time.time()
    app[ACCEPTING] = [True]
    app[OPENAPI] = openapi.encode_document(openapi.build_document(ops))
    for table in all_tables:
        table.install(app)
    app.cleanup_ctx.append(ports.client_session)
    app.on_response_prepare.append(add_server_timing)
    return app
