"""`/v1/snapshots`, `/v1/sandboxes/{id}/snapshots`, `/v1/sandboxes/{id}/fork` and
`/v1/pools` (Nyx)."""

from __future__ import annotations

import datetime as dt

import msgspec
from aiohttp import web

from tartarus.api.snapshots import (
    ForkBody,
    ForkResult,
    PoolInfo,
    PoolList,
    PruneQuery,
    PruneReport,
    RestoreBody,
    SetPoolBody,
    SnapshotEntry,
    SnapshotListQuery,
    SnapshotPage,
    SnapshotSandboxBody,
    TemplateSnapshotBody,
)
from tartarus.api.types import CreateSandboxRequest, SandboxInfo, TemplateName
from tartarus.auth.rbac import (
    SANDBOX_CREATE,
    SANDBOX_DELETE,
    SANDBOX_EXEC,
    SANDBOX_READ,
    TEMPLATE_MANAGE,
)
from tartarus.node.store import encode_cursor
from tartarus.server.access import principal_of, register_owner
from tartarus.server.context import SNAPSHOT_WIRING, manager, snapshot_wiring
from tartarus.server.problems import ApiError
from tartarus.server.routes.sandboxes import sandbox_info
from tartarus.server.routing import SANDBOX_ID, Reply, RouteTable, read_json, read_query, reply
from tartarus.snapshots.catalog import SnapshotRecord
from tartarus.snapshots.service import SnapshotNotFoundError
from tartarus.snapshots.wiring import visible_tenants

routes = RouteTable()

SNAPSHOT_ID = (("snapshot_id", "/id"),)


def _snapshot_owner(request: web.Request, snapshot_id: str) -> str | None:
    service = request.app.get(SNAPSHOT_WIRING)
    record = None if service is None else service.service.catalog.get(snapshot_id)
    return None if record is None else record.tenant


register_owner("snapshot_id", _snapshot_owner, lambda snapshot_id: f"snapshot {snapshot_id}")


def snapshot_entry(record: SnapshotRecord) -> SnapshotEntry:
    return SnapshotEntry(
        id=record.id,
        backend=record.backend,
        template=record.template,
        purpose=record.purpose,
        created_at=dt.datetime.fromtimestamp(record.created_at, dt.UTC),
        size_bytes=record.size_bytes,
        parent=record.parent,
        source_sandbox=record.source_sandbox,
        label=record.label,
        resources=record.resources,
        network=record.network,
        metadata=record.metadata,
        blob=record.blob,
    )


def _record(request: web.Request) -> SnapshotRecord:
    try:
        return snapshot_wiring(request).service.get(request.match_info["snapshot_id"])
    except SnapshotNotFoundError as e:
        raise ApiError(404, "not-found", str(e)) from e


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/pause",
    summary="Pause a sandbox",
    tag="sandboxes",
    replies=(Reply(200, SandboxInfo, description="Paused (or already paused)"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def pause_sandbox(request: web.Request) -> web.StreamResponse:
    """On gvisor and microvm: writes the sandbox to disk (files, processes, memory) and
    frees everything it used; it survives a server restart. On the jail: freezes its
    processes in place (memory stays in use; a server restart loses it). The timeout
    clock stops until it resumes; calls that need it running get 409 meanwhile."""
    record = await snapshot_wiring(request).pausing.pause(request.match_info["id"])
    return reply(sandbox_info(record))


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/resume",
    summary="Resume a paused sandbox",
    tag="sandboxes",
    replies=(Reply(200, SandboxInfo, description="Running (or already running)"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def resume_sandbox(request: web.Request) -> web.StreamResponse:
    """Runs a paused sandbox again under the same id, as it was when it paused, with
    the timeout it had left. Admitted like a create (quota, policy)."""
    record = await snapshot_wiring(request).pausing.resume(
        request.match_info["id"], principal_of(request)
    )
    return reply(sandbox_info(record))


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/snapshots",
    summary="Snapshot a running sandbox",
    tag="snapshots",
    body=SnapshotSandboxBody,
    body_required=False,
    replies=(
        Reply(
            201,
            SnapshotEntry,
            description="Taken; the sandbox keeps running",
            provides=SNAPSHOT_ID,
        ),
    ),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def snapshot_sandbox(request: web.Request) -> web.StreamResponse:
    """Saves the sandbox as it is now (memory, processes, files) without stopping it.
    A sandbox restored from a snapshot may be saved incrementally (only what changed)."""
    body = await read_json(request, SnapshotSandboxBody)
    record = await snapshot_wiring(request).snapshot(
        request.match_info["id"], label=body.label, metadata=body.metadata
    )
    return reply(
        snapshot_entry(record), status=201, headers={"Location": f"/v1/snapshots/{record.id}"}
    )


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/fork",
    summary="Fork a running sandbox",
    tag="snapshots",
    body=ForkBody,
    body_required=False,
    replies=(
        Reply(
            201,
            ForkResult,
            description="The copies, running",
            provides=(("id", "/sandboxes/0/id"),),
        ),
    ),
    errors=(404, 409),
    permission=SANDBOX_CREATE,
)
async def fork_sandbox(request: web.Request) -> web.StreamResponse:
    """Starts `count` sandboxes that each begin as an exact copy of this one (its
    memory, processes and files, as of now) and then go their own way."""
    body = await read_json(request, ForkBody)
    snapshot_id, records = await snapshot_wiring(request).fork(
        request.match_info["id"],
        body.count,
        caller=principal_of(request),
        timeout_s=body.timeout_s,
        metadata=body.metadata,
    )
    return reply(
        ForkResult(snapshot_id=snapshot_id, sandboxes=[sandbox_info(r) for r in records]),
        status=201,
    )


@routes.route(
    "GET",
    "/v1/snapshots",
    summary="List snapshots",
    tag="snapshots",
    query=SnapshotListQuery,
    replies=(Reply(200, SnapshotPage),),
    permission=SANDBOX_READ,
)
async def list_snapshots(request: web.Request) -> web.StreamResponse:
    q = read_query(request, SnapshotListQuery)
    after = int(q.cursor) if q.cursor else 0
    records = snapshot_wiring(request).service.catalog.records(
        template=q.template,
        purposes=tuple(q.purpose),
        tenants=visible_tenants(principal_of(request)),
        after_seq=after,
        limit=q.limit + 1,
    )
    page = records[: q.limit]
    more = len(records) > q.limit
    return reply(
        SnapshotPage(
            items=[snapshot_entry(r) for r in page],
            next_cursor=encode_cursor(page[-1].seq) if more and page else None,
        )
    )


@routes.route(
    "POST",
    "/v1/snapshots",
    summary="Build a template's warm snapshot",
    tag="snapshots",
    body=TemplateSnapshotBody,
    replies=(Reply(201, SnapshotEntry, provides=SNAPSHOT_ID),),
    errors=(404, 409),
    permission=TEMPLATE_MANAGE,
)
async def create_template_snapshot(request: web.Request) -> web.StreamResponse:
    """Starts a sandbox of the template, runs the template's warm-up script, snapshots
    it and stops it. Warm pools of the template restore from the newest one."""
    body = await read_json(request, TemplateSnapshotBody)
    record = await snapshot_wiring(request).build_template(
        body.template, backend=body.backend, resources=body.resources, label=body.label
    )
    return reply(
        snapshot_entry(record), status=201, headers={"Location": f"/v1/snapshots/{record.id}"}
    )


@routes.route(
    "GET",
    "/v1/snapshots/{snapshot_id}",
    summary="Get a snapshot",
    tag="snapshots",
    replies=(Reply(200, SnapshotEntry),),
    errors=(404,),
    permission=SANDBOX_READ,
)
async def get_snapshot(request: web.Request) -> web.StreamResponse:
    return reply(snapshot_entry(_record(request)))


@routes.route(
    "DELETE",
    "/v1/snapshots/{snapshot_id}",
    summary="Delete a snapshot",
    tag="snapshots",
    replies=(Reply(204, description="Deleted; files no one else holds are gone"),),
    errors=(404, 409),
    permission=SANDBOX_DELETE,
)
async def delete_snapshot(request: web.Request) -> web.StreamResponse:
    """Forgets the snapshot and deletes its files, unless sandboxes restored from it or
    incremental snapshots on top of it still hold them (they go when those do). A
    paused sandbox's snapshot cannot be deleted (409): it goes with the sandbox."""
    await snapshot_wiring(request).delete(request.match_info["snapshot_id"])
    return web.Response(status=204)


@routes.route(
    "POST",
    "/v1/snapshots/{snapshot_id}/restore",
    summary="Start a sandbox from a snapshot",
    tag="snapshots",
    body=RestoreBody,
    body_required=False,
    replies=(Reply(201, SandboxInfo, provides=SANDBOX_ID),),
    errors=(404, 409, 503),
    permission=SANDBOX_CREATE,
)
async def restore_snapshot(request: web.Request) -> web.StreamResponse:
    """The same as creating a sandbox with `from_snapshot`."""
    body = await read_json(request, RestoreBody)
    record = _record(request)
    create = CreateSandboxRequest(
        template=record.template,
        timeout_s=body.timeout_s,
        metadata=body.metadata,
        from_snapshot=record.id,
        checkpoint_on_stop=body.checkpoint_on_stop,
    )
    created, _ = await manager(request).create(create, caller=principal_of(request))
    return reply(
        sandbox_info(created), status=201, headers={"Location": f"/v1/sandboxes/{created.id}"}
    )


@routes.route(
    "DELETE",
    "/v1/snapshots",
    summary="Delete old snapshots",
    tag="snapshots",
    query=PruneQuery,
    replies=(Reply(200, PruneReport),),
    permission=SANDBOX_DELETE,
)
async def prune_snapshots(request: web.Request) -> web.StreamResponse:
    """Deletes the caller's snapshots that match every condition (template snapshots
    only when `purpose=template` is asked for)."""
    q = read_query(request, PruneQuery)
    removed, freed = await snapshot_wiring(request).prune(q, principal_of(request))
    return reply(PruneReport(removed=removed, freed_bytes=freed, dry_run=q.dry_run))


@routes.route(
    "GET",
    "/v1/pools",
    summary="List warm pools",
    tag="snapshots",
    replies=(Reply(200, PoolList),),
    permission=SANDBOX_READ,
)
async def list_pools(request: web.Request) -> web.StreamResponse:
    return reply(PoolList(items=snapshot_wiring(request).pools.status()))


@routes.route(
    "PUT",
    "/v1/pools/{template}",
    summary="Set a warm pool's size",
    tag="snapshots",
    body=SetPoolBody,
    replies=(Reply(200, PoolInfo, provides=(("template", "/template"),)),),
    errors=(422,),
    permission=TEMPLATE_MANAGE,
)
async def set_pool(request: web.Request) -> web.StreamResponse:
    """Keeps `size` restored, ready sandboxes of the template (0 empties the pool); a
    create that asks for what they are is then a hand-over, not a start. The pool
    fills in the background (building the template's warm snapshot first if needed)."""
    body = await read_json(request, SetPoolBody)
    template = request.match_info["template"]
    try:
        msgspec.convert(template, TemplateName)
    except msgspec.ValidationError as e:
        raise ApiError(422, "invalid-template", f"{template!r} is not a template name: {e}") from e
    return reply(snapshot_wiring(request).pools.set_target(template, body.size, body.backend))
