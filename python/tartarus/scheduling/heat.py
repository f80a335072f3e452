"""Phlegethon: heat classes. How hot a workload burns decides the pool it runs in.

The class comes from what the request asks for (vCPUs, memory) and from history: a
template or tenant whose sandboxes have used most of what they asked for runs one class
hotter than its request says. Each class maps to pools, in order of preference.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from tartarus.queue import Lane
from tartarus.runtime.types import Resources
from tartarus.scheduling.nodes import GENERAL_POOL


class Heat(StrEnum):
    COLD = "cold"
    WARM = "warm"
    HOT = "hot"
    INFERNO = "inferno"


HEATS: tuple[Heat, ...] = (Heat.COLD, Heat.WARM, Heat.HOT, Heat.INFERNO)

# Upper bounds (vCPUs, MiB) of each class but the last.
THRESHOLDS: dict[Heat, tuple[float, int]] = {
    Heat.COLD: (0.5, 256),
    Heat.WARM: (2.0, 2048),
    Heat.HOT: (8.0, 16384),
}
# A history whose peak use is above this share of the request makes the class one hotter.
HOT_HISTORY_SHARE = 0.75


class HeatHistory(msgspec.Struct, kw_only=True):
    """Exponentially weighted peak use, as a share of what was asked (0..1+)."""

    cpu_share: float = 0.0
    memory_share: float = 0.0
    samples: int = 0

    def observe(self, cpu_share: float, memory_share: float, weight: float = 0.3) -> HeatHistory:
        if self.samples == 0:
            return HeatHistory(cpu_share=cpu_share, memory_share=memory_share, samples=1)
        return HeatHistory(
            cpu_share=(1 - weight) * self.cpu_share + weight * cpu_share,
            memory_share=(1 - weight) * self.memory_share + weight * memory_share,
            samples=self.samples + 1,
        )


def hottest(histories: list[HeatHistory | None]) -> HeatHistory | None:
    """The history that burned hottest (the template's or the tenant's, say)."""
    known = [h for h in histories if h is not None and h.samples > 0]
    return max(known, key=lambda h: max(h.cpu_share, h.memory_share), default=None)


def classify(resources: Resources, history: HeatHistory | None = None) -> Heat:
    heat = Heat.INFERNO
    for candidate, (vcpus, memory_mib) in THRESHOLDS.items():
        if resources.vcpus <= vcpus and resources.memory_mib <= memory_mib:
            heat = candidate
            break
    if (
        history is not None
        and history.samples > 0
        and max(history.cpu_share, history.memory_share) > HOT_HISTORY_SHARE
        and heat is not Heat.INFERNO
    ):
        heat = HEATS[HEATS.index(heat) + 1]
    return heat


class PoolRouting(msgspec.Struct, frozen=True, kw_only=True):
    """Pools each heat class may use, most preferred first."""

    cold: list[str] = msgspec.field(default_factory=lambda: [GENERAL_POOL])
    warm: list[str] = msgspec.field(default_factory=lambda: [GENERAL_POOL])
    hot: list[str] = msgspec.field(default_factory=lambda: ["hot", GENERAL_POOL])
    inferno: list[str] = msgspec.field(default_factory=lambda: ["inferno", "hot", GENERAL_POOL])

    def pools(self, heat: Heat) -> list[str]:
        return list(getattr(self, heat.value))


def default_lane(heat: Heat) -> Lane:
    """Small work is usually interactive; big work usually batch."""
    return {Heat.COLD: Lane.SWIFT, Heat.WARM: Lane.MAIN}.get(heat, Lane.DEEP)
