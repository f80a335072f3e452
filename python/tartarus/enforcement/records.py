"""The records the error stream (Cocytus) and the Furies (Erinyes) write."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated

import msgspec
from msgspec import Meta


class ErrorCategory(StrEnum):
    # The scheduler found no node for a sandbox before its placement deadline.
    SCHEDULING = "scheduling"
    # A node could not create or start a sandbox.
    START = "start"
    # A node stopped heart-beating; its sandboxes were failed or rescheduled.
    NODE_LOST = "node-lost"
    # The queue refused or dead-lettered a request.
    QUEUE = "queue"
    # An enforcement action failed (a kill that did not happen, say).
    ENFORCEMENT = "enforcement"
    # Anything an API server or a node did not expect.
    INTERNAL = "internal"


class ErrorRecord(msgspec.Struct, kw_only=True, frozen=True):
    """One entry of the error stream."""

    category: ErrorCategory
    message: str
    sandbox_id: str = ""
    node_id: str = ""
    trace: str = ""
    ts: float = msgspec.field(default_factory=time.time)
    id: str = ""


# Which kind of enforcement acted: the field keeps its name (`fury`) for the API, the
# values say the job.
class Fury(StrEnum):
    TIMEOUT = "timeout"  # Alecto: a sandbox past its deadline
    RESOURCE_LIMIT = "resource-limit"  # Tisiphone: memory and CPU against the limits
    POLICY_VIOLATION = "policy-violation"  # Megaera: policy violations

    @classmethod
    def _missing_(cls, value: object) -> Fury | None:
        # Deprecated: the old names are still read (API input, stored events,
        # older nodes' reports) for one release; output always uses the new values.
        return DEPRECATED_FURIES.get(value) if isinstance(value, str) else None


# Old value -> new value, accepted on input until the next release.
DEPRECATED_FURIES: dict[str, Fury] = {
    "alecto": Fury.TIMEOUT,
    "tisiphone": Fury.RESOURCE_LIMIT,
    "megaera": Fury.POLICY_VIOLATION,
}


class Action(StrEnum):
    WARN = "warn"
    THROTTLE = "throttle"
    KILL = "kill"
    QUARANTINE = "quarantine"
    RECORD = "record"
    # Seen, not chosen: the kernel killed a process at the sandbox's memory limit.
    OOM_KILL = "oom-kill"


class EnforcementEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One thing the Furies did (or saw), and why."""

    fury: Fury
    action: Action
    sandbox_id: str
    detail: str
    node_id: str = ""
    tenant: str = ""
    # The measurement that triggered it (a share of the limit, seconds past the deadline).
    value: float = 0.0
    ts: float = msgspec.field(default_factory=time.time)
    id: str = ""


class PeakUse(msgspec.Struct, kw_only=True, frozen=True):
    """The most a sandbox used of what it asked for (shares of its vCPUs and memory
    limit, as Tisiphone sampled them), reported when it ends: Phlegethon's history."""

    sandbox_id: str
    template: str
    tenant: str = ""
    cpu_share: float = 0.0
    memory_share: float = 0.0


class LimitRule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # The share of the sandbox's limit (memory limit; vCPUs for CPU) that triggers it.
    share: Annotated[float, Meta(gt=0)]
    action: Action


class LimitPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    memory: list[LimitRule] = msgspec.field(
        default_factory=lambda: [
            LimitRule(share=0.8, action=Action.WARN),
            LimitRule(share=0.95, action=Action.KILL),
        ]
    )
    cpu: list[LimitRule] = msgspec.field(
        default_factory=lambda: [LimitRule(share=0.95, action=Action.WARN)]
    )
    interval_s: Annotated[float, Meta(gt=0)] = 1.0
