"""Request and response bodies of the `/v1/auth`, `/v1/policies` and `/v1/audit` routes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from tartarus.api.types import MAX_SEQ, TenantName

KeyId = Annotated[str, Meta(pattern=r"^[0-9a-f]{12}$", examples=["0123456789ab"])]
RoleName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9-]*$")]
PolicyName = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$", examples=["global"])
]


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class _Response(msgspec.Struct, kw_only=True):
    pass


# --- who am I ---------------------------------------------------------------------------


class WhoAmI(_Response, kw_only=True):
    subject: str
    tenant: str
    roles: list[str]
    # Every permission the roles grant.
    permissions: list[str]
    method: str
    credential: str = ""


# --- API keys ---------------------------------------------------------------------------


class CreateKeyRequest(_Request, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=128)]
    roles: Annotated[list[RoleName], Meta(min_length=1, max_length=16)]
    # Default: the caller's tenant; another tenant needs admin:tenants.
    tenant: TenantName | None = None
    # Seconds until the key stops working (none: it works until revoked).
    expires_in_s: Annotated[float, Meta(gt=0, le=10 * 365 * 86400)] | None = None


class RotateKeyRequest(_Request, kw_only=True):
    # How long the old key keeps working beside the new one (0: it stops at once).
    grace_s: Annotated[float, Meta(ge=0, le=30 * 86400)] = 3600.0


class KeyInfo(_Response, kw_only=True):
    id: KeyId
    # The visible part of the key (`tsk_<id>`): how it appears in logs and the audit log.
    prefix: str
    name: str
    tenant: str
    roles: list[str]
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None
    rotated_from: str | None = None
    active: bool


class KeyCreated(_Response, kw_only=True):
    key: KeyInfo
    # The whole key, shown this once: store it now.
    token: str


class KeyList(_Response, kw_only=True):
    items: list[KeyInfo]


# --- Themis policies ----------------------------------------------------------------------


class ApplyPolicyRequest(_Request, kw_only=True):
    # The policy document (YAML or JSON text; docs/policy.md describes the fields).
    document: Annotated[str, Meta(min_length=1, max_length=1 << 20)]
    # Optimistic concurrency: apply only if the current version is this one (0: only if
    # the policy does not exist yet).
    if_version: Annotated[int, Meta(ge=0, le=MAX_SEQ)] | None = None
    # Why (kept with the version).
    comment: Annotated[str, Meta(max_length=1024)] = ""


class RollbackPolicyRequest(_Request, kw_only=True):
    # The version whose content becomes the new current version.
    version: Annotated[int, Meta(ge=1, le=MAX_SEQ)]
    if_version: Annotated[int, Meta(ge=0, le=MAX_SEQ)] | None = None


class PolicyVersion(_Response, kw_only=True):
    name: str
    version: int
    # The tenant a tenant policy overrides the global one for (none: the global policy).
    tenant: str | None = None
    created_at: dt.datetime
    created_by: str
    comment: str = ""
    # The document as applied (YAML text) and what it means once parsed.
    document: str
    spec: dict[str, Any]


class PolicySummary(_Response, kw_only=True):
    name: str
    tenant: str | None = None
    version: int
    updated_at: dt.datetime
    updated_by: str


class PolicyList(_Response, kw_only=True):
    items: list[PolicySummary]


class PolicyHistory(_Response, kw_only=True):
    name: str
    versions: list[PolicyVersion]


class PolicyDiff(_Response, kw_only=True):
    name: str
    from_version: int
    to_version: int
    # A unified diff of the two documents' canonical YAML.
    diff: str


class EffectivePolicy(_Response, kw_only=True):
    tenant: str
    # The global policy with the tenant's overrides merged in, as the judges see it.
    spec: dict[str, Any]
    versions: dict[str, int]


# --- Aeacus audit --------------------------------------------------------------------------


class AuditEntry(_Response, kw_only=True):
    seq: int
    ts: float
    kind: str
    action: str
    outcome: str
    tenant: str
    subject: str
    method: str = ""
    credential: str = ""
    status: int = 0
    resource: dict[str, str] = msgspec.field(default_factory=dict)
    detail: str = ""
    verdicts: list[dict[str, Any]] = msgspec.field(default_factory=list)
    tags: list[str] = msgspec.field(default_factory=list)
    prev: str
    hash: str


ClientAction = Annotated[
    str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}\.[a-z][a-z0-9_.-]{0,63}$", examples=["mcp.run_code"])
]


class ClientEvent(_Request, kw_only=True):
    """Something a client did or refused on its caller's behalf (an MCP tool call).

    action: `client.what`, e.g. `mcp.run_code`
    outcome: allowed (done), denied (refused by the client: over a limit), failed
    status: the HTTP status the call's outcome corresponds to (0: none)
    """

    action: ClientAction
    outcome: Annotated[str, Meta(pattern=r"^(allowed|denied|failed)$")]
    status: Annotated[int, Meta(ge=0, le=599)] = 0
    resource: Annotated[
        dict[Annotated[str, Meta(max_length=32)], Annotated[str, Meta(max_length=256)]],
        Meta(max_length=8),
    ] = msgspec.field(default_factory=dict)
    detail: Annotated[str, Meta(max_length=1024)] = ""


class AuditPage(_Response, kw_only=True):
    items: list[AuditEntry]
    next_seq: int | None = None


class AuditVerification(_Response, kw_only=True):
    ok: bool
    entries: int
    first_seq: int | None = None
    last_seq: int | None = None
    head: str
    problems: list[str] = msgspec.field(default_factory=list)
