"""`/v1/policies`: Themis's versioned policy documents (apply, history, diff, rollback,
delete) and `/v1/policy/effective`: what the judges apply to a tenant."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.security import (
    ApplyPolicyRequest,
    EffectivePolicy,
    PolicyDiff,
    PolicyHistory,
    PolicyList,
    PolicySummary,
    PolicyVersion,
    RollbackPolicyRequest,
)
from tartarus.api.types import MAX_SEQ, TenantName
from tartarus.auth.rbac import AUTHENTICATED, POLICY_MANAGE
from tartarus.policy.documents import PolicyError, parse_document
from tartarus.policy.store import (
    PolicyNotFoundError,
    PolicyStore,
    Version,
    VersionConflictError,
)
from tartarus.server.access import PLATFORM, principal_of, register_owner, visible_tenant
from tartarus.server.problems import ApiError, not_found
from tartarus.server.routing import Reply, RouteTable, read_json, read_query, reply
from tartarus.server.security import security_of

routes = RouteTable()

POLICY = (("policy", "/name"),)


def _time(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _store(request: web.Request) -> PolicyStore:
    return security_of(request).policies


def _policy_owner(request: web.Request, name: str) -> str | None:
    # Every policy name belongs to the platform (PUT may create it): only operators see
    # policies at all; the handlers answer 404 for a name that does not exist.
    return PLATFORM


register_owner("policy", _policy_owner, lambda name: f"policy {name}")


def version_info(v: Version) -> PolicyVersion:
    spec = {} if v.deleted else v.parsed().spec
    return PolicyVersion(
        name=v.name,
        version=v.version,
        tenant=v.tenant,
        created_at=_time(v.created_at),
        created_by=v.created_by,
        comment=v.comment,
        document="" if v.deleted else v.document,
        spec=spec,
    )


def _problem(e: PolicyError) -> ApiError:
    if isinstance(e, VersionConflictError):
        return ApiError(409, "version-conflict", str(e))
    if isinstance(e, PolicyNotFoundError):
        return ApiError(404, "not-found", str(e))
    return ApiError(422, "invalid-policy", str(e))


@routes.route(
    "GET",
    "/v1/policies",
    summary="List policy documents",
    tag="policies",
    replies=(Reply(200, PolicyList),),
    permission=POLICY_MANAGE,
)
async def list_policies(request: web.Request) -> web.StreamResponse:
    """The current version of every policy document (deleted ones left out)."""
    if not principal_of(request).cross_tenant:
        return reply(PolicyList(items=[]))
    return reply(
        PolicyList(
            items=[
                PolicySummary(
                    name=v.name,
                    tenant=v.tenant,
                    version=v.version,
                    updated_at=_time(v.created_at),
                    updated_by=v.created_by,
                )
                for v in _store(request).documents()
            ]
        )
    )


class VersionQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which version.

    version: this version instead of the current one
    """

    version: Annotated[int, Meta(ge=1, le=MAX_SEQ)] | None = None


@routes.route(
    "GET",
    "/v1/policies/{policy}",
    summary="Get a policy document",
    tag="policies",
    query=VersionQuery,
    replies=(Reply(200, PolicyVersion),),
    errors=(404,),
    permission=POLICY_MANAGE,
)
async def get_policy(request: web.Request) -> web.StreamResponse:
    name = request.match_info["policy"]
    q = read_query(request, VersionQuery)
    store = _store(request)
    v = store.current(name) if q.version is None else store.version(name, q.version)
    if v is None:
        raise not_found(f"policy {name}" + ("" if q.version is None else f" version {q.version}"))
    return reply(version_info(v))


def _check_name(document: str, name: str) -> None:
    if parse_document(document).name != name:
        raise PolicyError(f"the document's name is not {name!r} (the name in the path)")


@routes.route(
    "PUT",
    "/v1/policies/{policy}",
    summary="Apply a policy document",
    tag="policies",
    body=ApplyPolicyRequest,
    replies=(Reply(200, PolicyVersion, description="The new current version", provides=POLICY),),
    errors=(409,),
    permission=POLICY_MANAGE,
)
async def apply_policy(request: web.Request) -> web.StreamResponse:
    """Validates the document and stores it as the next version. With `if_version`, only
    if the current version is still that one (409 otherwise: someone applied since)."""
    body = await read_json(request, ApplyPolicyRequest)
    name = request.match_info["policy"]
    principal = principal_of(request)
    if not principal.cross_tenant:
        raise ApiError(403, "forbidden", "policies belong to the platform's operators")
    try:
        _check_name(body.document, name)
        version = _store(request).apply(
            body.document,
            author=principal.subject,
            if_version=body.if_version,
            comment=body.comment,
        )
    except PolicyError as e:
        raise _problem(e) from e
    return reply(version_info(version))


class DeleteQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Delete only if current.

    if_version: delete only if the current version is this one
    """

    if_version: Annotated[int, Meta(ge=1, le=MAX_SEQ)] | None = None


@routes.route(
    "DELETE",
    "/v1/policies/{policy}",
    summary="Delete a policy document",
    tag="policies",
    query=DeleteQuery,
    replies=(Reply(200, PolicyVersion, description="The deletion, recorded as a version"),),
    errors=(404, 409),
    permission=POLICY_MANAGE,
)
async def delete_policy(request: web.Request) -> web.StreamResponse:
    """The document stops applying; its history stays, and a rollback brings it back."""
    q = read_query(request, DeleteQuery)
    try:
        version = _store(request).delete(
            request.match_info["policy"],
            author=principal_of(request).subject,
            if_version=q.if_version,
        )
    except PolicyError as e:
        raise _problem(e) from e
    return reply(version_info(version))


@routes.route(
    "GET",
    "/v1/policies/{policy}/history",
    summary="Every version of a policy document",
    tag="policies",
    replies=(Reply(200, PolicyHistory),),
    errors=(404,),
    permission=POLICY_MANAGE,
)
async def policy_history(request: web.Request) -> web.StreamResponse:
    name = request.match_info["policy"]
    versions = _store(request).history(name)
    if not versions:
        raise not_found(f"policy {name}")
    return reply(PolicyHistory(name=name, versions=[version_info(v) for v in versions]))


class DiffQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which versions to compare.

    from: the older version (default: the one before `to`)
    to: the newer version (default: the current one)
    """

    from_: Annotated[int, Meta(ge=1, le=MAX_SEQ)] | None = msgspec.field(default=None, name="from")
    to: Annotated[int, Meta(ge=1, le=MAX_SEQ)] | None = None


@routes.route(
    "GET",
    "/v1/policies/{policy}/diff",
    summary="Compare two versions of a policy document",
    tag="policies",
    query=DiffQuery,
    replies=(Reply(200, PolicyDiff),),
    errors=(404,),
    permission=POLICY_MANAGE,
)
async def diff_policy(request: web.Request) -> web.StreamResponse:
    """A unified diff of the two versions' canonical YAML (keys sorted)."""
    name = request.match_info["policy"]
    q = read_query(request, DiffQuery)
    store = _store(request)
    current = store.current(name)
    if current is None:
        raise not_found(f"policy {name}")
    to = q.to or current.version
    from_ = q.from_ or max(1, to - 1)
    try:
        diff = store.diff(name, from_, to)
    except PolicyError as e:
        raise _problem(e) from e
    return reply(PolicyDiff(name=name, from_version=from_, to_version=to, diff=diff))


@routes.route(
    "POST",
    "/v1/policies/{policy}/rollback",
    summary="Make an earlier version current again",
    tag="policies",
    body=RollbackPolicyRequest,
    replies=(Reply(200, PolicyVersion, description="The new current version"),),
    errors=(404, 409),
    permission=POLICY_MANAGE,
)
async def rollback_policy(request: web.Request) -> web.StreamResponse:
    """Writes a new version with the content of `version` (history is never rewritten)."""
    body = await read_json(request, RollbackPolicyRequest)
    try:
        version = _store(request).rollback(
            request.match_info["policy"],
            body.version,
            author=principal_of(request).subject,
            if_version=body.if_version,
        )
    except PolicyError as e:
        raise _problem(e) from e
    return reply(version_info(version))


class EffectiveQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Whose policy.

    tenant: this tenant (operators); default: the caller's own
    """

    tenant: TenantName | None = None


@routes.route(
    "GET",
    "/v1/policy/effective",
    summary="The policy the judges apply to a tenant",
    tag="policies",
    query=EffectiveQuery,
    replies=(Reply(200, EffectivePolicy),),
    errors=(404,),
    permission=AUTHENTICATED,
)
async def effective_policy(request: web.Request) -> web.StreamResponse:
    """The global policy with the tenant's overrides merged in: its quotas, allowed
    templates and backends, template defaults, and so on."""
    q = read_query(request, EffectiveQuery)
    principal = principal_of(request)
    tenant = visible_tenant(principal, q.tenant) or principal.tenant
    effective = _store(request).effective(tenant)
    return reply(
        EffectivePolicy(
            tenant=tenant, spec=msgspec.to_builtins(effective.spec), versions=effective.versions
        )
    )
