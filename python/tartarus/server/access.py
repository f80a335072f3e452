"""Cerberus at the door: authentication, permissions and tenant isolation for every route.

The middleware runs for every request, WebSocket upgrades and event streams included:

1. authenticate (`tartarus.auth.authenticate`): 401 without valid credentials, 403 for
   another user on the unix socket;
2. authorise: the route's declared permission must be granted by the caller's roles
   (403 otherwise; deny by default: a route without a permission stops the server at
   startup);
3. isolate: every path parameter that names a resource (a sandbox, an API key, ...) is
   looked up through its registered owner lookup; a resource of another tenant answers
   exactly like one that does not exist (404), so ids cannot be probed;
4. audit: denials and every change (any method but GET, and WebSocket sessions) go to
   the audit log (Aeacus) with who, what and the outcome.
"""

from __future__ import annotations

import inspect
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509
from cryptography.x509.oid import NameOID

from tartarus.auth.authenticate import Authenticator, Presented
from tartarus.auth.errors import AuthenticationError, ForbiddenError
from tartarus.auth.principal import Principal
from tartarus.auth.rbac import ROUTE_PERMISSIONS
from tartarus.errors import ConfigError
from tartarus.server.context import DIRECTORY
from tartarus.server.problems import ApiError, from_exception, not_found
from tartarus.server.routing import Operation

log = logging.getLogger(__name__)

PRINCIPAL_KEY = "tartarus.principal"
_SO_PEERCRED = struct.Struct("3i")

# An owner lookup answers who owns the resource a path parameter names: a tenant, or
# SHARED (every tenant sees it), or PLATFORM (only cross-tenant principals), or None
# when there is no such resource (404 before the handler runs). A lookup for a name
# that a request may create (a new policy) answers its owner whether or not it exists.
SHARED = "*"
PLATFORM = ""
OwnerLookup = Callable[[web.Request, str], str | Awaitable[str | None] | None]


@dataclass(frozen=True)
class Owner:
    lookup: OwnerLookup
    # What a 404 calls the resource, e.g. "sandbox sb-..." (the same words the handler
    # uses, so another tenant's resource and a missing one look alike).
    what: Callable[[str], str]


# Path parameters that name a resource, and how to find its owner. A route with a path
# parameter that is neither here nor in SUBORDINATE fails the startup check.
OWNERS: dict[str, Owner] = {}
# Parameters that only name something inside another resource (a process, a port or a
# code context of a sandbox, a path on its server).
SUBORDINATE: set[str] = {"pid", "port", "path", "context"}


def register_owner(param: str, lookup: OwnerLookup, what: Callable[[str], str]) -> None:
    OWNERS[param] = Owner(lookup, what)


class AuditSink(Protocol):
    def access(
        self,
        principal: Principal | None,
        *,
        action: str,
        outcome: str,
        status: int,
        resource: dict[str, str],
        detail: str = "",
    ) -> None: ...


def check_operations(operations: list[Operation]) -> None:
    """Refuses to start with a route that declares no (or an unknown) permission, or
    names a resource whose owner cannot be looked up."""
    problems = []
    for op in operations:
        where = f"{op.method} {op.path} ({op.operation_id})"
        if op.permission is None:
            problems.append(f"{where} declares no permission")
        elif op.permission not in ROUTE_PERMISSIONS:
            problems.append(f"{where} declares unknown permission {op.permission!r}")
        for param in op.path_params:
            if param not in OWNERS and param not in SUBORDINATE:
                problems.append(
                    f"{where}: path parameter {{{param}}} has no owner lookup "
                    "(tartarus.server.access.register_owner)"
                )
    if problems:
        raise ConfigError("routes fail the access check:\n  " + "\n  ".join(problems))


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a unix socket (None for TCP)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    _pid, uid, _gid = _SO_PEERCRED.unpack(raw)
    return int(uid)


def _certificate(request: web.Request) -> tuple[str | None, str]:
    """The verified client certificate's common name and serial (TLS only)."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None, ""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None, ""
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None, ""
    return str(names[0].value), format(cert.serial_number, "x")


def presented(request: web.Request) -> Presented:
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    bearer = value.strip() if scheme.lower() == "bearer" else None
    name, serial = _certificate(request)
    return Presented(
        peer_uid=peer_uid(request),
        bearer=bearer or None,
        certificate_name=name,
        certificate_serial=serial,
    )


def principal_of(request: web.Request) -> Principal:
    """The caller of a request that passed the middleware."""
    principal = request.get(PRINCIPAL_KEY)
    if isinstance(principal, Principal):
        return principal
    raise RuntimeError("no principal: the access middleware did not run")


def visible_tenant(principal: Principal, tenant: str | None) -> str | None:
    """The tenant filter for a listing: None (all) for cross-tenant principals when no
    tenant is asked for; the principal's own tenant otherwise (others are 404)."""
    if tenant is None:
        return None if principal.cross_tenant else principal.tenant
    if not principal.sees(tenant):
        raise not_found(f"tenant {tenant}")
    return tenant


def _visible(principal: Principal, tenant: str) -> bool:
    if tenant == SHARED:
        return True
    if tenant == PLATFORM:
        return principal.cross_tenant
    return principal.sees(tenant)


def access_middleware(
    authenticator: Authenticator, operations: list[Operation], audit: AuditSink | None
) -> Middleware:
    check_operations(operations)
    by_name = {op.operation_id: op for op in operations}

    def record(
        request: web.Request,
        principal: Principal | None,
        op: Operation | None,
        *,
        outcome: str,
        status: int,
        detail: str = "",
    ) -> None:
        if audit is not None:
            audit.access(
                principal,
                action=op.operation_id if op else f"{request.method} {request.path}",
                outcome=outcome,
                status=status,
                resource=dict(request.match_info),
                detail=detail,
            )

    @web.middleware
    async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        op = by_name.get(request.match_info.route.name or "")
        try:
            principal = await authenticator.authenticate(presented(request))
        except AuthenticationError as e:
            record(request, None, op, outcome="unauthenticated", status=401, detail=str(e))
            raise ApiError(
                401, "unauthorized", str(e), headers={"WWW-Authenticate": "Bearer"}
            ) from e
        except ForbiddenError as e:
            record(request, None, op, outcome="denied", status=403, detail=str(e))
            raise ApiError(403, "forbidden", str(e)) from e
        request[PRINCIPAL_KEY] = principal
        if op is None:  # no such route: the router's 404/405
            return await handler(request)
        assert op.permission is not None  # check_operations made sure
        if not principal.allows(op.permission):
            detail = (
                f"{principal.subject} (roles: {', '.join(principal.roles) or 'none'}) may not "
                f"{op.operation_id}: it needs {op.permission}"
            )
            record(request, principal, op, outcome="denied", status=403, detail=detail)
            raise ApiError(403, "forbidden", detail)
        for param, value in request.match_info.items():
            owner = OWNERS.get(param)
            if owner is None:
                continue
            found = owner.lookup(request, value)
            tenant = await found if inspect.isawaitable(found) else found
            if tenant is None or not _visible(principal, tenant):
                # Missing and not yours answer alike, before the handler reads anything,
                # so neither the status nor the body tells whether the id exists.
                record(
                    request,
                    principal,
                    op,
                    outcome="denied" if tenant is not None else "failed",
                    status=404,
                    detail=f"{param} of another tenant" if tenant is not None else "",
                )
                raise not_found(owner.what(value))
        audited = (request.method != "GET" or op.websocket) and not op.audits_itself
        if not audited:
            return await handler(request)
        if op.websocket:
            record(request, principal, op, outcome="allowed", status=101)
        try:
            response = await handler(request)
        except Exception as e:
            problem = from_exception(e)
            if not op.websocket:
                record(
                    request,
                    principal,
                    op,
                    outcome="failed",
                    status=problem.status if problem else 500,
                )
            raise
        if not op.websocket:
            record(request, principal, op, outcome="allowed", status=response.status)
        return response

    return check_access


def _sandbox_owner(request: web.Request, sandbox_id: str) -> Awaitable[str | None]:
    return request.app[DIRECTORY].tenant_of(sandbox_id)


register_owner("id", _sandbox_owner, lambda sandbox_id: f"sandbox {sandbox_id}")
