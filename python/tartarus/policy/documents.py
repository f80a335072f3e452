"""Themis's policy documents: what they may say, and how a tenant's overrides merge in.

A document is YAML:

    name: global            # one global document (no tenant) ...
    tenant: acme            # ... or one per tenant, overriding the global one for it
    description: "..."
    spec:
      resources: {max_sandboxes: 20, max_vcpus: 16, max_memory_mib: 32768,
                  per_template: {python: 10}}
      network: {allow: false}
      templates:
        allowed: ["python", "base"]
        defaults: {python: {resources: {memory_mib: 1024}, timeout_s: 600}}
      security: {backends: [gvisor, microvm], allow_trusted: false}
      secrets: {allowed: ["local:*", "vault:*"]}
      enforcement: {on_memory_limit: kill}
      audit: {retention_days: 365, tags: [soc2]}

A tenant's effective policy is the global spec with the tenant's spec merged over it
(mappings merge key by key, everything else is replaced). Every field has a permissive
default, so the zero-configuration server admits what it did before any policy exists;
docs/policy.md has a baseline for multi-tenant servers.
"""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Annotated, Any

import msgspec
import yaml
from msgspec import Meta

from tartarus.api.types import TENANT_PATTERN
from tartarus.errors import TartarusError
from tartarus.network.egress import validate as validate_egress
from tartarus.runtime.types import Backend

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_DOCUMENT_BYTES = 1 << 20


class PolicyError(TartarusError):
    """A policy document is invalid, or an operation on the policy store failed."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class Quotas(_Section, kw_only=True):
    """Minos: what one tenant may hold at once (none: no limit)."""

    max_sandboxes: Annotated[int, Meta(ge=0)] | None = None
    max_vcpus: Annotated[float, Meta(ge=0)] | None = None
    max_memory_mib: Annotated[int, Meta(ge=0)] | None = None
    # Template name → how many sandboxes of it may run at once.
    per_template: dict[str, Annotated[int, Meta(ge=0)]] = msgspec.field(default_factory=dict)


class NetworkPolicy(_Section, kw_only=True):
    # Whether sandboxes may ask for a network at all.
    allow: bool = True
    # Destinations networked sandboxes may reach: CIDRs or host names, each with an
    # optional port or range (`203.0.113.0/24:443`, `pypi.org:443`); empty: any public
    # destination. Private, link-local and metadata ranges stay closed unless an entry
    # names them; the host and other sandboxes always do (`tartarus.network.egress`).
    # Enforced in the kernel by the network layer (Styx); the judges check `allow`.
    egress: list[str] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        validate_egress(self.egress)


class ResourceDefaults(_Section, kw_only=True):
    vcpus: float | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    pids: int | None = None


class TemplateDefaults(_Section, kw_only=True):
    """Applied to fields a create request leaves at the API's default."""

    resources: ResourceDefaults = msgspec.field(default_factory=ResourceDefaults)
    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    backend: Backend | None = None
    # Replaces `network.egress` for sandboxes of this template (none: that list applies).
    egress: list[str] | None = None

    def __post_init__(self) -> None:
        if self.egress is not None:
            validate_egress(self.egress)


class TemplateRules(_Section, kw_only=True):
    # Glob patterns of templates tenants may start; `denied` wins over `allowed`.
    allowed: list[str] = msgspec.field(default_factory=lambda: ["*"])
    denied: list[str] = msgspec.field(default_factory=list)
    defaults: dict[str, TemplateDefaults] = msgspec.field(default_factory=dict)


class SecurityPolicy(_Section, kw_only=True):
    """Rhadamanthus's rules beyond templates and network."""

    # Backends sandboxes may run on (`auto` picks among these).
    backends: list[Backend] = msgspec.field(
        default_factory=lambda: [Backend.MICROVM, Backend.GVISOR, Backend.JAIL, Backend.WASM]
    )
    # Whether `trust: trusted` (which lets auto pick the jail) may be asked for.
    allow_trusted: bool = True
    # Untrusted work on the jail backend shares the host kernel with only namespaces
    # and seccomp in between.
    allow_untrusted_jail: bool = True
    # Untrusted work with a network on the jail: the riskiest combination.
    allow_untrusted_jail_network: bool = False
    # Largest single sandbox.
    max_vcpus: float | None = None
    max_memory_mib: int | None = None
    max_timeout_s: float | None = None


class SecretsPolicy(_Section, kw_only=True):
    # Glob patterns of secret references a tenant's sandboxes may use. `env:` and
    # `file:` read the server's own environment and files: only operators (admin:tenants)
    # may use them unless a pattern here allows them.
    allowed: list[str] = msgspec.field(default_factory=lambda: ["local:*", "vault:*"])


class EnforcementAction(StrEnum):
    WARN = "warn"
    THROTTLE = "throttle"
    STOP = "stop"
    KILL = "kill"
    QUARANTINE = "quarantine"


class Enforcement(_Section, kw_only=True):
    """What the enforcers (Erinyes) do when a sandbox breaks a limit."""

    on_timeout: EnforcementAction = EnforcementAction.STOP
    on_memory_limit: EnforcementAction = EnforcementAction.KILL
    on_cpu_limit: EnforcementAction = EnforcementAction.THROTTLE
    on_seccomp_violation: EnforcementAction = EnforcementAction.KILL


class AuditPolicy(_Section, kw_only=True):
    # Entries older than this are removed (the chain stays verifiable); none: kept.
    retention_days: Annotated[float, Meta(gt=0)] | None = 365.0
    # Compliance tags stamped on every entry of the tenant (e.g. soc2, hipaa).
    tags: list[Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]] = msgspec.field(
        default_factory=list
    )


class PolicySpec(_Section, kw_only=True):
    resources: Quotas = msgspec.field(default_factory=Quotas)
    network: NetworkPolicy = msgspec.field(default_factory=NetworkPolicy)
    templates: TemplateRules = msgspec.field(default_factory=TemplateRules)
    security: SecurityPolicy = msgspec.field(default_factory=SecurityPolicy)
    secrets: SecretsPolicy = msgspec.field(default_factory=SecretsPolicy)
    enforcement: Enforcement = msgspec.field(default_factory=Enforcement)
    audit: AuditPolicy = msgspec.field(default_factory=AuditPolicy)


class PolicyDocument(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, Meta(pattern=NAME_PATTERN)]
    tenant: Annotated[str, Meta(pattern=TENANT_PATTERN)] | None = None
    description: str = ""
    spec: dict[str, Any] = msgspec.field(default_factory=dict)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_spec(raw: dict[str, Any], where: str) -> PolicySpec:
    try:
        return msgspec.convert(raw, PolicySpec, strict=False)
    except msgspec.ValidationError as e:
        raise PolicyError(f"{where}: invalid policy: {e}") from e


def parse_document(text: str) -> PolicyDocument:
    """Parses and validates a document (its spec alone must be a valid policy)."""
    if len(text.encode()) > MAX_DOCUMENT_BYTES:
        raise PolicyError(f"a policy document may be at most {MAX_DOCUMENT_BYTES} bytes")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyError(f"not YAML: {e}") from e
    try:
        doc = msgspec.convert(raw, PolicyDocument, strict=False)
    except msgspec.ValidationError as e:
        raise PolicyError(f"not a policy document: {e}") from e
    to_spec(doc.spec, f"policy {doc.name!r}")
    return doc


def canonical_yaml(doc: PolicyDocument) -> str:
    return yaml.safe_dump(msgspec.to_builtins(doc), sort_keys=True, default_flow_style=False)
