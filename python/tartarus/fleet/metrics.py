"""Scaler metrics: per-node CPU and memory utilisation, queue depth per lane, launch and
error counts. Served as Prometheus text at `/metrics` (prometheus-client) and, on a
fleet's API servers, as JSON at `/v1/fleet/metrics` for the scaler (Persephone). A
single host serves the same names (`tartarus.fleet.host_metrics`).

Gauges come from a snapshot refreshed every couple of seconds (the registry and queue
are read asynchronously; a scrape only renders). Counters count what this API server
did; Prometheus sums them over every API server it scrapes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tartarus.queue import Lane, LaneDepth
from tartarus.scheduling.nodes import NodeUsage

if TYPE_CHECKING:
    from tartarus.fleet.state import FleetState


class NodeMetrics(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    pool: str
    draining: bool
    cpu_utilisation: float
    memory_utilisation: float
    sandboxes: int
    reserved_vcpus: float
    capacity_vcpus: float
    reserved_memory_mib: int
    capacity_memory_mib: int


class ScalerMetrics(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    nodes: list[NodeMetrics]
    queue: dict[Lane, LaneDepth]
    # Counted by this API server since it started.
    launches: int
    errors: int


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels."""
    return int(
        sum(
            s.value
            for metric in counter.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
    )


class Instruments:
    """The metrics every server exposes at `/metrics`, in one registry: a fleet's API
    servers, node agents and a single-host `tartarus serve` alike (same names, so one
    dashboard reads them all)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.launches = Counter(
            "tartarus_sandbox_launches", "Sandboxes started on a node", registry=r
        )
        self.errors = Counter(
            "tartarus_errors", "Records written to the error stream", ["category"], registry=r
        )
        self.enqueued = Counter(
            "tartarus_queue_enqueued", "Create requests queued", ["lane"], registry=r
        )
        self.enforcement = Counter(
            "tartarus_enforcement_actions",
            "Actions of the Furies",
            ["fury", "action"],
            registry=r,
        )
        self.decisions = Histogram(
            "tartarus_scheduling_decision_seconds",
            "Time to place one sandbox (scheduling and reservation)",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
        )
        self.queue_depth = Gauge(
            "tartarus_queue_depth", "Messages per lane", ["lane", "state"], registry=r
        )
        self.node_cpu = Gauge(
            "tartarus_node_cpu_utilisation", "Host CPU use (0..1)", ["node", "pool"], registry=r
        )
        self.node_memory = Gauge(
            "tartarus_node_memory_utilisation",
            "Host memory use (0..1)",
            ["node", "pool"],
            registry=r,
        )
        self.node_sandboxes = Gauge(
            "tartarus_node_sandboxes", "Sandboxes running on the node", ["node", "pool"], registry=r
        )
        self.node_reserved = Gauge(
            "tartarus_node_reserved_vcpus_ratio",
            "Reserved share of the node's vCPUs",
            ["node", "pool"],
            registry=r,
        )

    def set_node(self, node_id: str, pool: str, usage: NodeUsage, reserved_ratio: float) -> None:
        labels = (node_id, pool)
        self.node_cpu.labels(*labels).set(usage.cpu_utilisation)
        self.node_memory.labels(*labels).set(usage.memory_utilisation)
        self.node_sandboxes.labels(*labels).set(usage.sandboxes)
        self.node_reserved.labels(*labels).set(reserved_ratio)

    def set_depth(self, depth: dict[Lane, LaneDepth]) -> None:
        for lane, d in depth.items():
            self.queue_depth.labels(lane.value, "waiting").set(d.waiting)
            self.queue_depth.labels(lane.value, "in_flight").set(d.in_flight)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class FleetMetrics(Instruments):
    def __init__(self, state: FleetState) -> None:
        super().__init__()
        self._state = state
        self.snapshot = ScalerMetrics(at=0.0, nodes=[], queue={}, launches=0, errors=0)

    async def refresh(self) -> None:
        state = self._state
        nodes = await state.registry.nodes()
        depth = await state.lanes.depth()
        for gauge in (self.node_cpu, self.node_memory, self.node_sandboxes, self.node_reserved):
            gauge.clear()
        out = []
        for node in nodes:
            cap = node.spec.capacity
            self.set_node(node.id, node.spec.pool, node.usage, node.reserved_vcpus / cap.vcpus)
            out.append(
                NodeMetrics(
                    id=node.id,
                    pool=node.spec.pool,
                    draining=node.draining,
                    cpu_utilisation=node.usage.cpu_utilisation,
                    memory_utilisation=node.usage.memory_utilisation,
                    sandboxes=node.usage.sandboxes,
                    reserved_vcpus=node.reserved_vcpus,
                    capacity_vcpus=cap.vcpus,
                    reserved_memory_mib=node.reserved_memory_mib,
                    capacity_memory_mib=cap.memory_mib,
                )
            )
        self.set_depth(depth)
        self.snapshot = ScalerMetrics(
            at=time.time(),
            nodes=out,
            queue=depth,
            launches=_total(self.launches),
            errors=_total(self.errors),
        )
