"""`/v1/audit`: Aeacus's log (a tenant's own entries; every entry for operators) and
its verification."""

from __future__ import annotations

from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.security import AuditEntry, AuditPage, AuditVerification, ClientEvent
from tartarus.api.types import MAX_SEQ, TenantName
from tartarus.auth.rbac import ADMIN_AUDIT, AUTHENTICATED
from tartarus.policy.audit_log import AuditLog
from tartarus.server.access import principal_of, visible_tenant
from tartarus.server.routing import Reply, RouteTable, read_json, read_query, reply
from tartarus.server.security import security_of

routes = RouteTable()


def _log(request: web.Request) -> AuditLog:
    return security_of(request).audit


class AuditQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which entries.

    after: entries after this sequence number (`next_seq` of the previous page)
    limit: page size
    tenant: only this tenant's entries (operators; others always see only their own)
    """

    after: Annotated[int, Meta(ge=0, le=MAX_SEQ)] = 0
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    tenant: TenantName | None = None


@routes.route(
    "GET",
    "/v1/audit",
    summary="Read the audit log",
    tag="audit",
    query=AuditQuery,
    replies=(Reply(200, AuditPage),),
    permission=ADMIN_AUDIT,
)
async def read_audit(request: web.Request) -> web.StreamResponse:
    """Entries in order: admissions with every judge's verdict, denied requests, changes
    (who, what, outcome), policy and key changes, retention. Each carries its hash and
    the previous entry's hash."""
    q = read_query(request, AuditQuery)
    tenant = visible_tenant(principal_of(request), q.tenant)
    page, next_seq = _log(request).entries(tenant=tenant, after_seq=q.after, limit=q.limit)
    items = [
        msgspec.convert(msgspec.to_builtins(entry) | {"hash": digest}, AuditEntry)
        for entry, digest in page
    ]
    return reply(AuditPage(items=items, next_seq=next_seq))


@routes.route(
    "GET",
    "/v1/audit/verify",
    summary="Verify the audit log's hash chain",
    tag="audit",
    replies=(Reply(200, AuditVerification),),
    permission=ADMIN_AUDIT,
)
async def verify_audit(request: web.Request) -> web.StreamResponse:
    """Recomputes every entry's hash and checks every link; `ok` is false, with the
    places, if anything was altered, removed or reordered. `tartarus audit verify` does
    the same on the log file without the server."""
    result = _log(request).verify()
    return reply(msgspec.convert(msgspec.to_builtins(result), AuditVerification))


@routes.route(
    "POST",
    "/v1/audit/events",
    summary="Record a client's event",
    tag="audit",
    body=ClientEvent,
    replies=(Reply(204, description="Recorded"),),
    permission=AUTHENTICATED,
    audits_itself=True,
)
async def record_client_event(request: web.Request) -> web.StreamResponse:
    """A client acting for its caller (`tartarus mcp`) records what it did or refused,
    such as a tool call over its per-client limits. The entry (kind `client`) carries
    the caller's identity from its credentials, never from the body."""
    event = await read_json(request, ClientEvent)
    principal = principal_of(request)
    _log(request).append(
        kind="client",
        action=event.action,
        outcome=event.outcome,
        tenant=principal.tenant,
        subject=principal.subject,
        method=principal.method.value,
        credential=principal.credential,
        status=event.status,
        resource=event.resource,
        detail=event.detail,
    )
    return web.Response(status=204)
