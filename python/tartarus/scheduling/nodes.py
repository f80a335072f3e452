"""What the registry knows about a node, and what a sandbox asks of one."""

from __future__ import annotations

import re
from typing import Annotated

import msgspec
from msgspec import Meta

from tartarus.api.placement import (
    LabelKey,
    LabelValue,
    PlacementRules,
    Taint,
    TaintEffect,
    Toleration,
)
from tartarus.errors import TartarusError
from tartarus.runtime.types import Backend, Resources

# With the names that live in `tartarus.api.placement` (a leaf the SDK loads), re-exported here.
__all__ = [
    "GENERAL_POOL",
    "QUARANTINE_POOL",
    "InvalidSpecError",
    "LabelKey",
    "LabelValue",
    "NodeCapacity",
    "NodeSpec",
    "NodeState",
    "NodeUsage",
    "Placement",
    "PlacementRules",
    "PoolName",
    "Reservation",
    "Taint",
    "TaintEffect",
    "Toleration",
    "parse_label",
    "parse_taint",
]

# Nodes in this pool only take quarantined work, and quarantined work only goes there.
QUARANTINE_POOL = "quarantine"
GENERAL_POOL = "general"

PoolName = Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[a-z0-9-]+$")]


class InvalidSpecError(TartarusError):
    pass


_TAINT = re.compile(
    r"^([A-Za-z0-9._/-]+)(?:=([A-Za-z0-9._-]*))?(?::(NoSchedule|PreferNoSchedule))?$"
)


def parse_taint(text: str) -> Taint:
    """`key=value:Effect` (value and effect optional; the effect defaults to NoSchedule)."""
    match = _TAINT.match(text)
    if match is None:
        raise InvalidSpecError(
            f"invalid taint {text!r}: use KEY[=VALUE][:NoSchedule|:PreferNoSchedule]"
        )
    key, value, effect = match.groups()
    return Taint(key=key, value=value or "", effect=TaintEffect(effect or "NoSchedule"))


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9._/-]{1,63}", key):
        raise InvalidSpecError(f"invalid label {text!r}: use KEY=VALUE")
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,63}", value):
        raise InvalidSpecError(f"invalid label value in {text!r}: letters, digits, . _ -")
    return key, value


class NodeCapacity(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vcpus: Annotated[float, Meta(gt=0)]
    memory_mib: Annotated[int, Meta(gt=0)]
    backends: list[Backend]
    max_sandboxes: Annotated[int, Meta(ge=1)] = 1000


class NodeSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a node agent says about itself when it joins."""

    id: Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._-]+$")]
    # Where API servers reach the node's own API (exec, files, logs are forwarded there).
    address: str
    capacity: NodeCapacity
    labels: dict[LabelKey, LabelValue] = msgspec.field(default_factory=dict)
    taints: list[Taint] = msgspec.field(default_factory=list)
    pool: PoolName = GENERAL_POOL
    version: str = ""
    # The key API servers use on the node's own API when the node joined with a client
    # certificate (empty: they use the fleet's token). Never listed (`public`).
    access_key: str = ""

    def public(self) -> NodeSpec:
        return msgspec.structs.replace(self, access_key="")


class NodeUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Measured on the node at each heartbeat (host-wide utilisation, 0..1)."""

    sandboxes: int = 0
    cpu_utilisation: float = 0.0
    memory_utilisation: float = 0.0


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    sandbox_id: str
    vcpus: float
    memory_mib: int
    # Affinity groups of the sandbox (for affinity / anti-affinity of later ones).
    groups: list[str] = msgspec.field(default_factory=list)


class NodeState(msgspec.Struct, kw_only=True):
    spec: NodeSpec
    usage: NodeUsage = msgspec.field(default_factory=NodeUsage)
    reservations: list[Reservation] = msgspec.field(default_factory=list)
    draining: bool = False
    joined_at: float = 0.0
    last_seen: float = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def reserved_vcpus(self) -> float:
        return sum(r.vcpus for r in self.reservations)

    @property
    def reserved_memory_mib(self) -> int:
        return sum(r.memory_mib for r in self.reservations)

    def group_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.reservations:
            for g in r.groups:
                counts[g] = counts.get(g, 0) + 1
        return counts


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """One scheduling question: everything the scheduler weighs for one sandbox."""

    sandbox_id: str
    resources: Resources
    backend: Backend = Backend.AUTO
    rules: PlacementRules = msgspec.field(default_factory=PlacementRules)
    tenant: str = ""
    template: str = "base"
    quarantined: bool = False
