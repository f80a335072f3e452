"""The `[auth]` section of `tartarus.toml`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta


class AuthMode(StrEnum):
    # TCP needs credentials once any exist (a static key, an API key, an OIDC issuer);
    # with none configured, loopback TCP stays open like the unix socket (zero config).
    AUTO = "auto"
    REQUIRED = "required"  # TCP always needs credentials
    OFF = "off"  # no authentication on TCP (loopback only; for benchmarks)


class OidcIssuer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A trusted token issuer; its keys come from its JWKS via OIDC discovery."""

    issuer: str
    audience: str
    # Where the tenant and the roles are in the token's claims.
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    # Tenant and roles for tokens that carry none (empty: such tokens are refused).
    default_tenant: str = ""
    default_roles: list[str] = msgspec.field(default_factory=list)
    # Claim values → role names (e.g. an IdP group to `developer`); unmapped values
    # that are role names are used as they are.
    role_map: dict[str, str] = msgspec.field(default_factory=dict)
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    # Discovery document; default `<issuer>/.well-known/openid-configuration`.
    discovery_url: str | None = None


class TlsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """TLS for the TCP listener; with `client_ca`, client certificates (node agents)
    are verified and identify their holder. Files are re-read when they change."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class AuthSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    mode: AuthMode = AuthMode.AUTO
    roles_file: Path | None = None
    oidc: list[OidcIssuer] = msgspec.field(default_factory=list)
    # Allowed clock difference for `exp`, `nbf` and `iat`.
    clock_skew_s: Annotated[float, Meta(ge=0, le=600)] = 60.0
    # How long fetched JWKS are trusted before a refetch; an unknown `kid` refetches
    # sooner, at most once per `jwks_min_refresh_s`.
    jwks_ttl_s: Annotated[float, Meta(ge=1)] = 300.0
    jwks_min_refresh_s: Annotated[float, Meta(ge=0)] = 10.0
    tls: TlsSettings | None = None
    # Roles of a node agent authenticated by its client certificate.
    agent_roles: list[str] = msgspec.field(default_factory=lambda: ["node-agent"])
