"""`/v1/sandboxes`: create, list, get, delete, set timeout, stats."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.types import (
    MAX_LIST_LIMIT,
    CreateSandboxRequest,
    Cursor,
    GraceSeconds,
    SandboxInfo,
    SandboxPage,
    SandboxStatsInfo,
    SetTimeoutRequest,
    TenantName,
)
from tartarus.auth.rbac import SANDBOX_CREATE, SANDBOX_DELETE, SANDBOX_READ
from tartarus.node.manager import cursor_from
from tartarus.node.store import ListFilter, SandboxRecord, encode_cursor
from tartarus.runtime.types import Backend, SandboxState
from tartarus.server.access import principal_of, visible_tenant
from tartarus.server.context import directory, live_sandbox, manager
from tartarus.server.problems import ApiError
from tartarus.server.routing import (
    SANDBOX_ID,
    Header,
    Reply,
    RouteTable,
    read_json,
    read_query,
    reply,
)

routes = RouteTable()

IDEMPOTENCY_HEADER = "Idempotency-Key"


def _time(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


def sandbox_info(record: SandboxRecord) -> SandboxInfo:
    return SandboxInfo(
        id=record.id,
        template=record.template,
        backend=record.backend,
        state=record.state,
        created_at=dt.datetime.fromtimestamp(record.created_at, dt.UTC),
        expires_at=_time(record.expires_at) if record.live else None,
        ended_at=_time(record.ended_at),
        resources=record.resources,
        metadata=record.metadata,
        network=record.network,
        trust=record.trust,
        backend_reason=record.backend_reason,
        detail=record.detail,
        tenant=record.tenant,
        secrets=record.secrets,
        node=record.node,
        paused_at=_time(record.paused_at),
        timeout_left_s=record.remaining_s,
        on_timeout=record.on_timeout,
        auto_pause_after_s=record.auto_pause_after_s,
        ending=record.ending,
        stop_grace_s=record.stop_grace_s,
    )


@routes.route(
    "POST",
    "/v1/sandboxes",
    summary="Create and start a sandbox",
    tag="sandboxes",
    body=CreateSandboxRequest,
    # Every field has a default: an empty POST starts a `base` sandbox.
    body_required=False,
    headers=(
        Header(
            IDEMPOTENCY_HEADER,
            "Retrying a create with the same key returns the first sandbox instead of a "
            "second one (kept 24 hours).",
            {"type": "string", "minLength": 1, "maxLength": 255},
        ),
    ),
    replies=(
        Reply(201, SandboxInfo, description="Created and running", provides=SANDBOX_ID),
        Reply(
            200,
            SandboxInfo,
            description="A replay: the sandbox this key created before",
            provides=SANDBOX_ID,
        ),
    ),
    errors=(404, 409, 503),
    permission=SANDBOX_CREATE,
)
async def create_sandbox(request: web.Request) -> web.StreamResponse:
    """Starts a sandbox from a template on the requested (or best available) backend. It
    runs until `timeout_s` passes or it is deleted, whether or not a client is connected."""
    body, key = await create_input(request)
    record, replayed = await directory(request).create(body, key, principal_of(request))
    return created_reply(record, replayed)


async def create_input(request: web.Request) -> tuple[CreateSandboxRequest, str | None]:
    """The create request's body and idempotency key (validated)."""
    body = await read_json(request, CreateSandboxRequest)
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is not None and not 1 <= len(key) <= 255:
        raise ApiError(422, "invalid-header", f"{IDEMPOTENCY_HEADER} must be 1-255 characters")
    return body, key


def created_reply(record: SandboxRecord, replayed: bool) -> web.Response:
    headers = {"Location": f"/v1/sandboxes/{record.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return reply(sandbox_info(record), status=200 if replayed else 201, headers=headers)


class ListQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Filters for listing sandboxes.

    state: only sandboxes in these states (repeat the parameter for several)
    template: only sandboxes of this template
    backend: only sandboxes on this backend
    metadata: only sandboxes whose metadata has KEY=VALUE (repeat for several)
    tenant: only this tenant's sandboxes (operators; others always see only their own)
    limit: page size
    cursor: next_cursor from the previous page
    """

    state: list[SandboxState] = msgspec.field(default_factory=list)
    template: str | None = None
    backend: Backend | None = None
    metadata: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]+=.*$")]] = msgspec.field(
        default_factory=list
    )
    tenant: TenantName | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST_LIMIT)] = 100
    cursor: Cursor | None = None


@routes.route(
    "GET",
    "/v1/sandboxes",
    summary="List sandboxes",
    tag="sandboxes",
    query=ListQuery,
    replies=(Reply(200, SandboxPage),),
    permission=SANDBOX_READ,
)
async def list_sandboxes(request: web.Request) -> web.StreamResponse:
    """Sandboxes in creation order, live and recently ended (kept 24 hours), a page at a
    time."""
    flt, cursor, limit = list_input(request)
    page, next_seq = await directory(request).list(flt, cursor=cursor, limit=limit)
    return page_reply(page, next_seq)


def list_input(request: web.Request) -> tuple[ListFilter, int, int]:
    """The listing's filter (limited to what the caller may see), cursor and page size."""
    q = read_query(request, ListQuery)
    flt = ListFilter(
        tenant=visible_tenant(principal_of(request), q.tenant),
        states=tuple(q.state),
        template=q.template,
        backend=q.backend,
        metadata=tuple(tuple(m.split("=", 1)) for m in q.metadata),  # type: ignore[misc]
    )
    return flt, cursor_from(q.cursor), q.limit


def page_reply(page: list[SandboxRecord], next_seq: int | None) -> web.Response:
    return reply(
        SandboxPage(
            items=[sandbox_info(r) for r in page],
            next_cursor=None if next_seq is None else encode_cursor(next_seq),
        )
    )


@routes.route(
    "GET",
    "/v1/sandboxes/{id}",
    summary="Get a sandbox",
    tag="sandboxes",
    replies=(Reply(200, SandboxInfo),),
    errors=(404,),
    permission=SANDBOX_READ,
)
async def get_sandbox(request: web.Request) -> web.StreamResponse:
    return reply(sandbox_info(await directory(request).get(request.match_info["id"])))


class DeleteQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to stop the sandbox.

    grace_s: seconds between SIGTERM and the kill (0 kills at once; unset: the
    sandbox's `stop_grace_s`, from its create or its template, else 0)
    """

    grace_s: GraceSeconds | None = None


@routes.route(
    "DELETE",
    "/v1/sandboxes/{id}",
    summary="Stop and delete a sandbox",
    tag="sandboxes",
    query=DeleteQuery,
    replies=(Reply(204, description="Stopped (or already ended)"),),
    errors=(404,),
    permission=SANDBOX_DELETE,
)
async def delete_sandbox(request: web.Request) -> web.StreamResponse:
    """Kills the sandbox (after `grace_s` of SIGTERM if given) and frees everything it
    held. Its record stays listable as `stopped` for 24 hours."""
    q = read_query(request, DeleteQuery)
    await directory(request).delete(request.match_info["id"], grace_s=q.grace_s)
    return web.Response(status=204)


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/timeout",
    summary="Set a sandbox's timeout",
    tag="sandboxes",
    body=SetTimeoutRequest,
    replies=(Reply(200, SandboxInfo),),
    errors=(404, 409),
    permission=SANDBOX_CREATE,
)
async def set_sandbox_timeout(request: web.Request) -> web.StreamResponse:
    """The sandbox now stops `timeout_s` seconds from now (longer or shorter than before)."""
    body = await read_json(request, SetTimeoutRequest)
    record = manager(request).set_timeout(request.match_info["id"], body.timeout_s)
    return reply(sandbox_info(record))


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/stats",
    summary="Resource usage of a sandbox",
    tag="sandboxes",
    replies=(Reply(200, SandboxStatsInfo),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def sandbox_stats(request: web.Request) -> web.StreamResponse:
    stats = await (await live_sandbox(request)).sandbox.stats()
    return reply(
        SandboxStatsInfo(
            cpu_seconds=stats.cpu_seconds,
            memory_bytes=stats.memory_bytes,
            memory_limit_bytes=stats.memory_limit_bytes,
            pids=stats.pids,
        )
    )
