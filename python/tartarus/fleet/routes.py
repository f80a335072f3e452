"""The fleet's HTTP surface on an API server.

- The sandbox routes are the server's own: the plugin gives them the fleet's directory
  (`tartarus.fleet.directory`) and the proxy that forwards a sandbox's requests to the
  node that runs it.
- `/v1/nodes/...`: node agents join, heartbeat, pull work and report (they authenticate
  with the server's API key as a bearer token, or with a client certificate naming the
  node: such an agent may act for that node only).
- Operators: nodes, queue depth and dead letters, the error stream (Cocytus), enforcement
  events, the quarantine list, scaler metrics (Prometheus text at `/metrics` comes from
  `host_metrics`, as on every server).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from msgspec import Meta

from tartarus.auth.principal import AuthMethod
from tartarus.auth.rbac import ADMIN_TENANTS, NODE_AGENT
from tartarus.enforcement.records import EnforcementEvent, ErrorCategory, ErrorRecord
from tartarus.errors import InvalidRequestError, NotFoundError, RefusedError
from tartarus.fleet.coordinator import Coordinator
from tartarus.fleet.metrics import ScalerMetrics
from tartarus.fleet.wire import (
    Heartbeat,
    JoinReply,
    NodeReport,
    WorkBatch,
    WorkDone,
    WorkRequest,
    WorkVerdict,
)
from tartarus.node.manager import SandboxManager
from tartarus.policy.judges import Judges
from tartarus.queue import DeadLetter, Lane, LaneDepth, Message
from tartarus.scheduling.nodes import NodeSpec, NodeState
from tartarus.server.access import SHARED, principal_of, register_owner
from tartarus.server.context import DIRECTORY, FORWARD
from tartarus.server.routing import Reply, RouteTable, read_json, read_query, reply

COORDINATOR = web.AppKey("coordinator", Coordinator)

nodes = RouteTable()
operators = RouteTable()


def coordinator(request: web.Request) -> Coordinator:
    return request.app[COORDINATOR]


def node_of(request: web.Request) -> str:
    """The node a node route is about; a node agent with a client certificate may only
    speak for itself (operators and the fleet's API key for any node)."""
    node_id = request.match_info["node"]
    principal = principal_of(request)
    if principal.method is AuthMethod.CERTIFICATE and principal.subject != f"agent:{node_id}":
        raise RefusedError(f"{principal.subject} may not act for node {node_id}")
    return node_id


# Nodes are fleet-wide (any principal allowed by the route's permission may name one).
register_owner("node", lambda request, node_id: SHARED, lambda node_id: f"node {node_id}")


# --- node agents -----------------------------------------------------------------------


@nodes.route(
    "POST",
    "/v1/nodes",
    summary="Join the fleet (node agents)",
    tag="nodes",
    body=NodeSpec,
    replies=(Reply(200, JoinReply),),
    permission=NODE_AGENT,
)
async def join_node(request: web.Request) -> web.StreamResponse:
    """A node agent registers (again) with its capacity, labels, taints and pool."""
    spec = await read_json(request, NodeSpec)
    principal = principal_of(request)
    if principal.method is AuthMethod.CERTIFICATE and principal.subject != f"agent:{spec.id}":
        raise RefusedError(f"{principal.subject} may not join as node {spec.id}")
    coord = coordinator(request)
    await coord.state.registry.register(spec)
    expected = [r.id for r in await coord.state.book.on_node(spec.id)]
    ttl = coord.settings.heartbeat_ttl_s
    return reply(JoinReply(node_id=spec.id, heartbeat_s=ttl / 4, ttl_s=ttl, expected=expected))


@nodes.route(
    "POST",
    "/v1/nodes/{node}/heartbeat",
    summary="Heartbeat (node agents)",
    tag="nodes",
    body=Heartbeat,
    replies=(Reply(204, description="Alive"),),
    errors=(404,),
    permission=NODE_AGENT,
)
async def node_heartbeat(request: web.Request) -> web.StreamResponse:
    """404 means the fleet forgot the node (its TTL ran out): it must join again."""
    node_id = node_of(request)
    beat = await read_json(request, Heartbeat)
    if not await coordinator(request).state.registry.heartbeat(
        node_id, beat.usage, draining=beat.draining
    ):
        raise NotFoundError(f"node {node_id} (join again) not found")
    return web.Response(status=204)


@nodes.route(
    "POST",
    "/v1/nodes/{node}/work",
    summary="Take work (node agents)",
    tag="nodes",
    body=WorkRequest,
    replies=(Reply(200, WorkBatch),),
    errors=(404,),
    permission=NODE_AGENT,
)
async def take_work(request: web.Request) -> web.StreamResponse:
    """Waits up to `wait_s` for the first item of the node's inbox, then takes what else
    is there (up to `max`)."""
    node_id = node_of(request)
    ask = await read_json(request, WorkRequest)
    coord = coordinator(request)
    if await coord.state.registry.node(node_id) is None:
        raise NotFoundError(f"node {node_id} (join again) not found")
    inbox = coord.state.inbox(node_id)
    items: list[Message] = []
    first = await inbox.get(node_id, timeout_s=min(max(ask.wait_s, 0.0), 30.0))
    while first is not None:
        items.append(first)
        if len(items) >= ask.max:
            break
        first = await inbox.get(node_id, timeout_s=0)
    return reply(WorkBatch(items=items))


@nodes.route(
    "POST",
    "/v1/nodes/{node}/work/done",
    summary="Finish work (node agents)",
    tag="nodes",
    body=WorkDone,
    replies=(Reply(200, WorkVerdict),),
    permission=NODE_AGENT,
)
async def work_done(request: web.Request) -> web.StreamResponse:
    node_id = node_of(request)
    done = await read_json(request, WorkDone)
    keep = await coordinator(request).reports.work_done(node_id, done)
    return reply(WorkVerdict(keep=keep))


@nodes.route(
    "POST",
    "/v1/nodes/{node}/report",
    summary="Report changes (node agents)",
    tag="nodes",
    body=NodeReport,
    replies=(Reply(204, description="Recorded"),),
    permission=NODE_AGENT,
)
async def node_report(request: web.Request) -> web.StreamResponse:
    """Sandbox state changes, enforcement events and errors the node saw, oldest first."""
    node_id = node_of(request)
    report = await read_json(request, NodeReport)
    await coordinator(request).reports.report(node_id, report)
    return web.Response(status=204)


@nodes.route(
    "DELETE",
    "/v1/nodes/{node}",
    summary="Leave the fleet (node agents, operators)",
    tag="nodes",
    replies=(Reply(204, description="Gone"),),
    permission=NODE_AGENT,
)
async def leave_node(request: web.Request) -> web.StreamResponse:
    """Removes the node: its queued work goes to other nodes, its sandboxes fail."""
    node_id = node_of(request)
    coord = coordinator(request)
    if await coord.state.registry.deregister(node_id) is not None:
        await coord.reaper.node_gone(node_id, f"node {node_id} left the fleet")
    return web.Response(status=204)


# --- operators ---------------------------------------------------------------------------


class NodeList(msgspec.Struct, kw_only=True):
    items: list[NodeState]


@operators.route(
    "GET",
    "/v1/nodes",
    summary="List nodes",
    tag="fleet",
    replies=(Reply(200, NodeList),),
    permission=ADMIN_TENANTS,
)
async def list_nodes(request: web.Request) -> web.StreamResponse:
    """Live nodes with their capacity, measured use and reservations."""
    items = await coordinator(request).state.registry.nodes()
    for node in items:
        node.spec = node.spec.public()
    return reply(NodeList(items=items))


class QueueInfo(msgspec.Struct, kw_only=True):
    lanes: dict[Lane, LaneDepth]
    dead_letters: list[DeadLetter]


class DeadQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which dead letters.

    limit: at most this many, newest first
    """

    limit: Annotated[int, Meta(ge=1, le=1000)] = 50


@operators.route(
    "GET",
    "/v1/queue",
    summary="Queue depth and dead letters",
    tag="fleet",
    query=DeadQuery,
    replies=(Reply(200, QueueInfo),),
    permission=ADMIN_TENANTS,
)
async def queue_info(request: web.Request) -> web.StreamResponse:
    q = read_query(request, DeadQuery)
    lanes = coordinator(request).state.lanes
    return reply(
        QueueInfo(lanes=await lanes.depth(), dead_letters=await lanes.dead_letters(q.limit))
    )


class ErrorQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which errors.

    category: only this category
    sandbox: only errors of this sandbox
    node: only errors on this node
    since: only errors at or after this time (unix seconds)
    limit: at most this many, newest first
    """

    category: ErrorCategory | None = None
    sandbox: str | None = None
    node: str | None = None
    since: Annotated[float, Meta(ge=0)] = 0.0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class ErrorList(msgspec.Struct, kw_only=True):
    items: list[ErrorRecord]


@operators.route(
    "GET",
    "/v1/errors",
    summary="Query the error stream",
    tag="fleet",
    query=ErrorQuery,
    replies=(Reply(200, ErrorList),),
    permission=ADMIN_TENANTS,
)
async def list_errors(request: web.Request) -> web.StreamResponse:
    q = read_query(request, ErrorQuery)
    filters = {
        "category": q.category.value if q.category else "",
        "sandbox_id": q.sandbox or "",
        "node_id": q.node or "",
    }
    items = await coordinator(request).state.errors.query(filters, since=q.since, limit=q.limit)
    return reply(ErrorList(items=items))


class PurgeQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to purge.

    before: drop records older than this (unix seconds)
    """

    before: Annotated[float, Meta(ge=0)]


class Purged(msgspec.Struct, kw_only=True):
    removed: int


@operators.route(
    "DELETE",
    "/v1/errors",
    summary="Purge old error records",
    tag="fleet",
    query=PurgeQuery,
    replies=(Reply(200, Purged),),
    permission=ADMIN_TENANTS,
)
async def purge_errors(request: web.Request) -> web.StreamResponse:
    q = read_query(request, PurgeQuery)
    if q.before > time.time():
        raise InvalidRequestError("before lies in the future", slug="invalid-query")
    return reply(Purged(removed=await coordinator(request).state.errors.purge(q.before)))


class EventQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which enforcement events.

    sandbox: only events of this sandbox
    since: only events at or after this time (unix seconds)
    limit: at most this many, newest first
    """

    sandbox: str | None = None
    since: Annotated[float, Meta(ge=0)] = 0.0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class EventList(msgspec.Struct, kw_only=True):
    items: list[EnforcementEvent]


@operators.route(
    "GET",
    "/v1/events",
    summary="Enforcement events",
    tag="fleet",
    query=EventQuery,
    replies=(Reply(200, EventList),),
    permission=ADMIN_TENANTS,
)
async def list_events(request: web.Request) -> web.StreamResponse:
    """What the Furies did: timeout, resource-limit and policy-violation events."""
    q = read_query(request, EventQuery)
    items = await coordinator(request).state.events.query(
        {"sandbox_id": q.sandbox or ""}, since=q.since, limit=q.limit
    )
    return reply(EventList(items=items))


class ViolationBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    sandbox_id: Annotated[str, Meta(pattern=r"^sb-[0-9a-f]{16}$")]
    detail: Annotated[str, Meta(min_length=1, max_length=2000)]


@operators.route(
    "POST",
    "/v1/events",
    summary="Record a policy violation",
    tag="fleet",
    body=ViolationBody,
    replies=(Reply(201, EnforcementEvent),),
    errors=(404,),
    permission=ADMIN_TENANTS,
)
async def record_violation(request: web.Request) -> web.StreamResponse:
    """Megaera records it against the sandbox and its tenant; a tenant with three
    violations is quarantined."""
    body = await read_json(request, ViolationBody)
    event = await coordinator(request).reports.violation(body.sandbox_id, body.detail)
    return reply(event, status=201)


Subject = Annotated[str, Meta(pattern=r"^(tenant|template|group):[A-Za-z0-9._:/@-]{1,128}$")]


class QuarantineBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    subject: Subject
    reason: Annotated[str, Meta(min_length=1, max_length=1000)]


class QuarantineList(msgspec.Struct, kw_only=True):
    items: dict[str, str]


@operators.route(
    "GET",
    "/v1/quarantine",
    summary="Quarantined subjects",
    tag="fleet",
    replies=(Reply(200, QuarantineList),),
    permission=ADMIN_TENANTS,
)
async def list_quarantine(request: web.Request) -> web.StreamResponse:
    return reply(QuarantineList(items=await coordinator(request).state.registry.quarantined()))


@operators.route(
    "POST",
    "/v1/quarantine",
    summary="Quarantine a tenant, template or group",
    tag="fleet",
    body=QuarantineBody,
    replies=(Reply(204, description="Flagged"),),
    permission=ADMIN_TENANTS,
)
async def add_quarantine(request: web.Request) -> web.StreamResponse:
    """New sandboxes of the subject run only in the quarantine pool (Typhon)."""
    body = await read_json(request, QuarantineBody)
    await coordinator(request).state.registry.quarantine(body.subject, body.reason)
    return web.Response(status=204)


class SubjectQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Whom to release.

    subject: tenant:NAME, template:NAME or group:NAME
    """

    subject: Subject


@operators.route(
    "DELETE",
    "/v1/quarantine",
    summary="Release a subject from quarantine",
    tag="fleet",
    query=SubjectQuery,
    replies=(Reply(204, description="Released (or was not flagged)"),),
    permission=ADMIN_TENANTS,
)
async def release_quarantine(request: web.Request) -> web.StreamResponse:
    q = read_query(request, SubjectQuery)
    await coordinator(request).state.registry.release_quarantine(q.subject)
    return web.Response(status=204)


@operators.route(
    "GET",
    "/v1/fleet/metrics",
    summary="Scaler metrics",
    tag="fleet",
    replies=(Reply(200, ScalerMetrics),),
    permission=ADMIN_TENANTS,
)
async def scaler_metrics(request: web.Request) -> web.StreamResponse:
    """Per-node utilisation, queue depth per lane, launch and error counts."""
    return reply(coordinator(request).metrics.snapshot)


class FleetPlugin:
    """Plugs the coordinator into `tartarus serve` (see `tartarus.server.plugins`)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def middlewares(self) -> list[Middleware]:
        return []

    def route_tables(self) -> list[RouteTable]:
        return [nodes, operators]

    @asynccontextmanager
    async def running(self, manager: SandboxManager, app: web.Application) -> AsyncIterator[None]:
        # Sandboxes run on the node agents; the manager lends its admission judges and
        # its templates.
        app[COORDINATOR] = self.coordinator
        app[DIRECTORY] = self.coordinator.directory
        app[FORWARD] = self.coordinator.proxy.forward
        self.coordinator.intake.admission = manager.admission
        self.coordinator.intake.template_defaults = manager.provider.defaults_for
        if isinstance(manager.admission, Judges):
            # Minos counts across every API server of the fleet.
            manager.admission.shared = self.coordinator.state.quota
        async with self.coordinator.running():
            yield
