"""Who made a request: the principal every authenticator produces."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from tartarus.auth.rbac import ADMIN_TENANTS, permits

DEFAULT_TENANT = "default"


class AuthMethod(StrEnum):
    LOCAL = "local"  # the owning user on the unix socket (peer credentials)
    API_KEY = "api-key"
    JWT = "jwt"
    CERTIFICATE = "certificate"  # a node agent's client certificate (mTLS)
    STATIC_KEY = "static-key"  # TARTARUS_API_KEY: the operator's bootstrap key
    ANONYMOUS = "anonymous"  # auth is off: loopback TCP with nothing configured


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated caller: its tenant, roles and the permissions they grant."""

    subject: str
    tenant: str
    roles: tuple[str, ...]
    # Permission patterns granted by the roles (`sandbox:*`, `*`, ...).
    grants: frozenset[str]
    method: AuthMethod
    # The API key id or the certificate's serial, for the audit log.
    credential: str = ""

    def allows(self, permission: str) -> bool:
        return permits(self.grants, permission)

    @property
    def cross_tenant(self) -> bool:
        """May act on every tenant's resources (platform operators)."""
        return self.allows(ADMIN_TENANTS)

    def sees(self, tenant: str) -> bool:
        return tenant == self.tenant or self.cross_tenant


# The server acting on its own behalf (in-process callers that bypass HTTP).
SYSTEM = Principal(
    subject="system",
    tenant=DEFAULT_TENANT,
    roles=("admin",),
    grants=frozenset({"*"}),
    method=AuthMethod.LOCAL,
)
