"""Builds the aiohttp application: routes, the problem+json middleware and access checks."""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from tartarus.agent.manager import SandboxManager
from tartarus.server import openapi
from tartarus.server.context import MANAGER, NYX, STARTED_AT
from tartarus.server.problems import ApiError, from_exception, problem_response
from tartarus.server.routes import (
    code,
    files,
    logs,
    processes,
    sandboxes,
    service,
    snapshots,
    terminal,
)
from tartarus.server.routes import exec as exec_routes
from tartarus.server.routes.service import ACCEPTING, OPENAPI
from tartarus.server.routing import MAX_JSON_BODY, Operation, RouteTable
from tartarus.snapshots.nyx import Nyx

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
    snapshots.routes,
)

_SO_PEERCRED = struct.Struct("3i")


def operations() -> list[Operation]:
    return [op for table in TABLES for op in table.operations]


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a unix socket (None for TCP)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    _pid, uid, _gid = _SO_PEERCRED.unpack(raw)
    return int(uid)


def access_middleware(owner_uid: int, api_key: str | None) -> Middleware:
    """Unix socket: only the owning uid. TCP: the API key, when one is configured."""

    @web.middleware
    async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is not None:
            if uid != owner_uid:
                raise ApiError(
                    403, "forbidden", f"this server belongs to uid {owner_uid}, not to uid {uid}"
                )
        elif api_key is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise ApiError(
                    401,
                    "unauthorized",
                    "missing or wrong API key: send 'Authorization: Bearer <TARTARUS_API_KEY>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    return check_access


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
    *,
    owner_uid: int,
    api_key: str | None = None,
    nyx: Nyx | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[problem_middleware, access_middleware(owner_uid, api_key)],
        client_max_size=MAX_JSON_BODY,
    )
    app[MANAGER] = manager
    if nyx is not None:
        app[NYX] = nyx
    app[STARTED_AT] = time.time()
    app[ACCEPTING] = [True]
    ops = operations()
    app[OPENAPI] = openapi.encode_document(openapi.build_document(ops))
    for table in TABLES:
        table.install(app)
    return app
