"""`/v1/auth`: who am I, and the API keys of a tenant (create, list, revoke, rotate)."""

from __future__ import annotations

import datetime as dt
import time

import msgspec
from aiohttp import web

from tartarus.api.security import (
    CreateKeyRequest,
    KeyCreated,
    KeyInfo,
    KeyList,
    RotateKeyRequest,
    WhoAmI,
)
from tartarus.api.types import TenantName
from tartarus.auth.keys import ApiKey, KeyStore
from tartarus.auth.rbac import ADMIN_KEYS, AUTHENTICATED, expand
from tartarus.errors import ConfigError
from tartarus.server.access import principal_of, register_owner, visible_tenant
from tartarus.server.problems import ApiError, not_found
from tartarus.server.routing import Reply, RouteTable, read_json, read_query, reply
from tartarus.server.security import SECURITY, security_of

routes = RouteTable()

# What a created key supplies to the operations on it.
KEY_ID = (("key_id", "/key/id"),)


def _time(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


def key_info(key: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=key.id,
        prefix=key.prefix,
        name=key.name,
        tenant=key.tenant,
        roles=key.roles,
        created_at=dt.datetime.fromtimestamp(key.created_at, dt.UTC),
        created_by=key.created_by,
        expires_at=_time(key.expires_at),
        revoked_at=_time(key.revoked_at),
        last_used_at=_time(key.last_used_at),
        rotated_from=key.rotated_from,
        active=key.active(time.time()),
    )


def _store(request: web.Request) -> KeyStore:
    return security_of(request).keys


def _key(request: web.Request) -> ApiKey:
    key_id = request.match_info["key_id"]
    key = _store(request).get(key_id)
    if key is None:
        raise not_found(f"API key {key_id}")
    return key


def _check_within(request: web.Request, roles: list[str]) -> None:
    """A caller can only hand out, revoke or rotate what it holds itself."""
    principal = principal_of(request)
    if not security_of(request).roles.within(roles, principal.grants):
        raise ApiError(
            403,
            "forbidden",
            f"roles {', '.join(roles)} grant more than {principal.subject} holds",
        )


def _managed_key(request: web.Request) -> ApiKey:
    key = _key(request)
    _check_within(request, key.roles)
    return key


def _key_owner(request: web.Request, key_id: str) -> str | None:
    key = request.app[SECURITY].keys.get(key_id)
    return None if key is None else key.tenant


register_owner("key_id", _key_owner, lambda key_id: f"API key {key_id}")


@routes.route(
    "GET",
    "/v1/auth/whoami",
    summary="The caller: tenant, roles and permissions",
    tag="auth",
    replies=(Reply(200, WhoAmI),),
    permission=AUTHENTICATED,
)
async def whoami(request: web.Request) -> web.StreamResponse:
    principal = principal_of(request)
    return reply(
        WhoAmI(
            subject=principal.subject,
            tenant=principal.tenant,
            roles=list(principal.roles),
            permissions=sorted(expand(principal.grants)),
            method=principal.method.value,
            credential=principal.credential,
        )
    )


@routes.route(
    "POST",
    "/v1/auth/keys",
    summary="Create an API key",
    tag="auth",
    body=CreateKeyRequest,
    replies=(
        Reply(
            201,
            KeyCreated,
            description="Created; the token is shown only now",
            provides=KEY_ID,
        ),
    ),
    errors=(403, 404),
    permission=ADMIN_KEYS,
)
async def create_key(request: web.Request) -> web.StreamResponse:
    """Makes a key for the caller's tenant (or, for operators, any tenant) with roles no
    broader than the caller's own. The answer carries the whole key once; only its hash
    is kept."""
    body = await read_json(request, CreateKeyRequest)
    principal = principal_of(request)
    tenant = visible_tenant(principal, body.tenant) or principal.tenant
    security = security_of(request)
    try:
        security.roles.check_known(body.roles)
    except ConfigError as e:
        raise ApiError(422, "unknown-role", str(e)) from e
    _check_within(request, body.roles)
    expires_at = None if body.expires_in_s is None else time.time() + body.expires_in_s
    key, token = _store(request).create(
        tenant=tenant,
        name=body.name,
        roles=list(dict.fromkeys(body.roles)),
        created_by=principal.subject,
        expires_at=expires_at,
    )
    return reply(KeyCreated(key=key_info(key), token=token), status=201)


class KeyListQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which keys.

    tenant: only this tenant's keys (operators; others always see only their own)
    """

    tenant: TenantName | None = None


@routes.route(
    "GET",
    "/v1/auth/keys",
    summary="List API keys",
    tag="auth",
    query=KeyListQuery,
    replies=(Reply(200, KeyList),),
    permission=ADMIN_KEYS,
)
async def list_keys(request: web.Request) -> web.StreamResponse:
    q = read_query(request, KeyListQuery)
    tenant = visible_tenant(principal_of(request), q.tenant)
    return reply(KeyList(items=[key_info(k) for k in _store(request).list(tenant)]))


@routes.route(
    "GET",
    "/v1/auth/keys/{key_id}",
    summary="Get an API key",
    tag="auth",
    replies=(Reply(200, KeyInfo),),
    errors=(404,),
    permission=ADMIN_KEYS,
)
async def get_key(request: web.Request) -> web.StreamResponse:
    return reply(key_info(_key(request)))


@routes.route(
    "DELETE",
    "/v1/auth/keys/{key_id}",
    summary="Revoke an API key",
    tag="auth",
    replies=(Reply(200, KeyInfo, description="Revoked (or already revoked)"),),
    errors=(404,),
    permission=ADMIN_KEYS,
)
async def revoke_key(request: web.Request) -> web.StreamResponse:
    """The key stops working at once, on every request that follows."""
    key = _managed_key(request)
    return reply(key_info(_store(request).revoke(key.id)))


@routes.route(
    "POST",
    "/v1/auth/keys/{key_id}/rotate",
    summary="Rotate an API key",
    tag="auth",
    body=RotateKeyRequest,
    replies=(
        Reply(
            201,
            KeyCreated,
            description="The new key; the old one ends after grace_s",
            provides=KEY_ID,
        ),
    ),
    errors=(404, 409),
    permission=ADMIN_KEYS,
)
async def rotate_key(request: web.Request) -> web.StreamResponse:
    """A new key with the same tenant, name and roles. The old key keeps working for
    `grace_s` seconds so clients can switch without an outage."""
    body = await read_json(request, RotateKeyRequest)
    key = _managed_key(request)
    if not key.active(time.time()):
        raise ApiError(409, "key-inactive", f"API key {key.id} is revoked or expired")
    new, token = _store(request).rotate(
        key.id, grace_s=body.grace_s, created_by=principal_of(request).subject
    )
    return reply(KeyCreated(key=key_info(new), token=token), status=201)
