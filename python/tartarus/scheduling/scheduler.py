"""Moirai: picks the node for a sandbox. A pure function of the request and the registry's
view of the nodes, so it is cheap to run again when a reservation loses a race.

Filters (a node failing one is out, with the reason recorded): draining, pool (heat class
routing; the quarantine pool takes quarantined work only, and quarantined work goes
nowhere else), backend, node selector labels, NoSchedule taints not tolerated, free
capacity (vCPUs, memory, sandbox count), anti-affinity, affinity. Then the preferred pool
wins, nodes with untolerated PreferNoSchedule taints come last, and the strategy scores
the rest: least-loaded spreads, bin-packing fills the fullest node that still fits.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from tartarus.errors import TartarusError
from tartarus.runtime.types import Backend
from tartarus.scheduling.heat import Heat, PoolRouting
from tartarus.scheduling.nodes import QUARANTINE_POOL, NodeState, Placement, TaintEffect

# Weight of measured host utilisation against reserved capacity in the load score.
MEASURED_WEIGHT = 0.3
MAX_REASONS_SHOWN = 8


class Strategy(StrEnum):
    LEAST_LOADED = "least-loaded"
    BIN_PACKING = "bin-packing"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    pool: str
    heat: Heat
    score: float


class NoNodeFitsError(TartarusError):
    def __init__(self, placement: Placement, reasons: dict[str, str]) -> None:
        self.reasons = reasons
        r = placement.resources
        want = f"{r.vcpus:g} vCPUs, {r.memory_mib} MiB, backend {placement.backend.value}"
        if not reasons:
            detail = "no node agent has joined (start one with `tartarus agent --join`)"
        else:
            shown = list(reasons.items())[:MAX_REASONS_SHOWN]
            detail = "; ".join(f"{node}: {why}" for node, why in shown)
            if len(reasons) > len(shown):
                detail += f"; and {len(reasons) - len(shown)} more"
        super().__init__(f"no node can run sandbox {placement.sandbox_id} ({want}): {detail}")


def _pool_rank(placement: Placement, node: NodeState, pools: list[str]) -> int | str:
    pool = node.spec.pool
    if placement.quarantined:
        return (
            0 if pool == QUARANTINE_POOL else "not in the quarantine pool (the work is quarantined)"
        )
    if pool == QUARANTINE_POOL:
        return "quarantine pool: takes quarantined work only"
    if pool not in pools:
        return f"pool {pool!r} does not take this heat class (pools: {', '.join(pools)})"
    return pools.index(pool)


def _state_and_backend(placement: Placement, node: NodeState) -> str | None:
    if node.draining:
        return "draining"
    backends = node.spec.capacity.backends
    if placement.backend is not Backend.AUTO and placement.backend not in backends:
        have = ", ".join(b.value for b in backends) or "none"
        return f"no {placement.backend.value} backend (has {have})"
    return None if backends else "no usable backend"


def _labels_and_taints(placement: Placement, node: NodeState) -> str | None:
    rules = placement.rules
    for key, value in rules.node_selector.items():
        if node.spec.labels.get(key) != value:
            return f"label {key}={value} missing"
    for taint in node.spec.taints:
        if taint.effect is TaintEffect.NO_SCHEDULE and not any(
            t.tolerates(taint) for t in rules.tolerations
        ):
            return f"taint {taint} not tolerated"
    return None


def _capacity(placement: Placement, node: NodeState) -> str | None:
    cap, want = node.spec.capacity, placement.resources
    free_vcpus = cap.vcpus - node.reserved_vcpus
    if want.vcpus > free_vcpus + 1e-9:
        return f"needs {want.vcpus:g} vCPUs, {max(free_vcpus, 0):g} free"
    free_memory = cap.memory_mib - node.reserved_memory_mib
    if want.memory_mib > free_memory:
        return f"needs {want.memory_mib} MiB, {max(free_memory, 0)} MiB free"
    if len(node.reservations) >= cap.max_sandboxes:
        return f"full ({cap.max_sandboxes} sandboxes)"
    return None


def _affinity(placement: Placement, here: dict[str, int], groups_anywhere: set[str]) -> str | None:
    for group in placement.rules.anti_affinity:
        if here.get(group):
            return f"runs group {group!r} (anti-affinity)"
    for group in placement.rules.affinity:
        if group in groups_anywhere and not here.get(group):
            return f"does not run group {group!r} (affinity)"
    return None


def _unfit(placement: Placement, node: NodeState, groups: dict[str, dict[str, int]]) -> str | None:
    return (
        _state_and_backend(placement, node)
        or _labels_and_taints(placement, node)
        or _capacity(placement, node)
        or (
            _affinity(placement, groups[node.id], groups[""].keys() & set(placement.rules.affinity))
            if groups
            else None
        )
    )


def load_after(node: NodeState, placement: Placement) -> float:
    """The node's load (0..1) if the sandbox were placed on it."""
    cap = node.spec.capacity
    cpu = (node.reserved_vcpus + placement.resources.vcpus) / cap.vcpus
    memory = (node.reserved_memory_mib + placement.resources.memory_mib) / cap.memory_mib
    measured = max(node.usage.cpu_utilisation, node.usage.memory_utilisation)
    return (1 - MEASURED_WEIGHT) * max(cpu, memory) + MEASURED_WEIGHT * measured


def schedule(
    placement: Placement,
    nodes: list[NodeState],
    *,
    heat: Heat,
    strategy: Strategy = Strategy.LEAST_LOADED,
    routing: PoolRouting | None = None,
) -> Decision:
    """The best node for `placement`, or NoNodeFitsError saying why each node was out."""
    pools = (routing or PoolRouting()).pools(heat)
    # Group counts per node (and under "" for the whole fleet), only when rules need them.
    groups: dict[str, dict[str, int]] = {}
    if placement.rules.affinity or placement.rules.anti_affinity:
        groups = {n.id: n.group_counts() for n in nodes}
        groups[""] = {g: 1 for counts in groups.values() for g in counts}
    reasons: dict[str, str] = {}
    best: tuple[tuple[int, int, float, str], Decision] | None = None
    for node in nodes:
        rank = _pool_rank(placement, node, pools)
        why = rank if isinstance(rank, str) else _unfit(placement, node, groups)
        if why is not None:
            reasons[node.id] = why
            continue
        assert isinstance(rank, int)
        prefer_not = sum(
            1
            for taint in node.spec.taints
            if taint.effect is TaintEffect.PREFER_NO_SCHEDULE
            and not any(t.tolerates(taint) for t in placement.rules.tolerations)
        )
        load = load_after(node, placement)
        score = -load if strategy is Strategy.BIN_PACKING else load
        key = (rank, prefer_not, score, node.id)
        if best is None or key < best[0]:
            decision = Decision(node_id=node.id, pool=node.spec.pool, heat=heat, score=1 - load)
            best = (key, decision)
    if best is None:
        raise NoNodeFitsError(placement, reasons)
    return best[1]
