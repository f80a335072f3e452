"""Where a sandbox may run, as a create request asks it: labels, taints and the
tolerations, affinity and lane of `placement`.

A leaf module (msgspec only), so the SDK can build a placement without loading the
scheduler; `tartarus.scheduling.nodes` re-exports these for nodes and Moirai.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

LabelKey = Annotated[str, Meta(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9._/-]+$")]
LabelValue = Annotated[str, Meta(max_length=63, pattern=r"^[A-Za-z0-9._-]*$")]


class TaintEffect(StrEnum):
    # Only sandboxes that tolerate the taint may be placed on the node.
    NO_SCHEDULE = "NoSchedule"
    # Other nodes are preferred; the node is still used when nothing else fits.
    PREFER_NO_SCHEDULE = "PreferNoSchedule"


class Taint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key: LabelKey
    value: LabelValue = ""
    effect: TaintEffect = TaintEffect.NO_SCHEDULE

    def __str__(self) -> str:
        return f"{self.key}={self.value}:{self.effect.value}"


class Toleration(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key: LabelKey
    # None tolerates the key with any value.
    value: LabelValue | None = None

    def tolerates(self, taint: Taint) -> bool:
        return self.key == taint.key and (self.value is None or self.value == taint.value)


class PlacementRules(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a sandbox may run, as the client asks it (`placement` in a create request)."""

    # Only nodes with all of these labels.
    node_selector: dict[LabelKey, LabelValue] = msgspec.field(default_factory=dict)
    # Taints this sandbox accepts.
    tolerations: list[Toleration] = msgspec.field(default_factory=list)
    # Groups this sandbox belongs to (what later affinity rules refer to).
    groups: list[LabelKey] = msgspec.field(default_factory=list)
    # Run on a node that already runs a sandbox of each of these groups (when any does).
    affinity: list[LabelKey] = msgspec.field(default_factory=list)
    # Never on a node that runs a sandbox of any of these groups.
    anti_affinity: list[LabelKey] = msgspec.field(default_factory=list)
    # The queue lane: swift (interactive), main, deep (batch). Default: from the heat class.
    lane: Literal["swift", "main", "deep"] | None = None
