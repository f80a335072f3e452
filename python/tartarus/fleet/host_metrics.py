"""`/metrics` (Prometheus text) on every server: a fleet's API servers serve the fleet's
metrics (`FleetMetrics`), a single-host `tartarus serve` and each node agent serve their
own host's, under the same names:

- `tartarus_node_cpu_utilisation`, `tartarus_node_memory_utilisation`,
  `tartarus_node_sandboxes` for this host, measured at each scrape;
- `tartarus_queue_depth{lane,state}`: a single host has no queue (a create runs at
  once), so every lane reads 0 there; `tartarus_sandboxes_creating` counts the creates
  in progress instead;
- `tartarus_sandbox_launches_total` and `tartarus_errors_total{category="start"}`,
  counted as the server's store records sandboxes starting or failing to start;
- `tartarus_sandbox_egress_dropped_packets{sandbox,reason}`: packets the network layer
  dropped for each running sandbox (`denied` by its egress policy, `spoofed` source),
  and `tartarus_enforcement_actions_total{fury="policy-violation"}` counting the
  violation events they raised (`tartarus.enforcement.egress_drops`);
- `tartarus_sandbox_teardowns_in_flight`: deleted sandboxes whose code has stopped (their
  DELETE has answered) and whose mounts, cgroups, links and files are still being
  removed, and `tartarus_sandbox_teardown_failures_total`, those teardowns that had to
  force their way.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter, Gauge

from tartarus.auth.rbac import ADMIN_TENANTS
from tartarus.enforcement.egress_drops import EgressDropWatcher, EventSink
from tartarus.enforcement.records import EnforcementEvent, ErrorCategory
from tartarus.fleet.host_usage import HostUsage
from tartarus.fleet.metrics import Instruments
from tartarus.network.egress import Drops
from tartarus.node.manager import SandboxManager
from tartarus.node.store import SandboxRecord, Store
from tartarus.queue import LANES, LaneDepth
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.nodes import GENERAL_POOL, NodeUsage
from tartarus.server.routing import Reply, RouteTable

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
METRICS = web.AppKey("metrics", Instruments)

routes = RouteTable()


@routes.route(
    "GET",
    "/metrics",
    summary="Prometheus metrics",
    tag="metrics",
    replies=(Reply(200, description="Prometheus text exposition format (text/plain)"),),
    permission=ADMIN_TENANTS,
)
async def prometheus(request: web.Request) -> web.StreamResponse:
    metrics = request.app[METRICS]
    if isinstance(metrics, HostMetrics):
        metrics.refresh()
    return web.Response(body=metrics.render(), headers={"Content-Type": PROMETHEUS_TEXT})


class HostMetrics(Instruments):
    """One host's metrics; `observe` is fed every record the store writes."""

    def __init__(self, node_id: str | None = None, pool: str = GENERAL_POOL) -> None:
        super().__init__()
        self.node_id = node_id or socket.gethostname()
        self.pool = pool
        self.creating = Gauge(
            "tartarus_sandboxes_creating",
            "Creates in progress on this host",
            registry=self.registry,
        )
        self.egress_drops = Gauge(
            "tartarus_sandbox_egress_dropped_packets",
            "Packets the network layer dropped for a running sandbox",
            ["sandbox", "reason"],
            registry=self.registry,
        )
        self.teardowns = Gauge(
            "tartarus_sandbox_teardowns_in_flight",
            "Deleted sandboxes whose code has stopped and whose resources are being freed",
            registry=self.registry,
        )
        self.teardown_failures = Counter(
            "tartarus_sandbox_teardown_failures_total",
            "Background teardowns that had to force their way",
            registry=self.registry,
        )
        self._failures_seen = 0
        self._usage = HostUsage()
        self._states: dict[str, SandboxState] = {}
        self.manager: SandboxManager | None = None
        # Where enforcement events also go (a node agent's outbox, reported to the fleet).
        self.event_sinks: list[EventSink] = []

    def event(self, event: EnforcementEvent) -> None:
        self.enforcement.labels(event.fury.value, event.action.value).inc()

    def set_drops(self, sandbox_id: str, drops: Drops) -> None:
        self.egress_drops.labels(sandbox_id, "denied").set(drops.denied)
        self.egress_drops.labels(sandbox_id, "spoofed").set(drops.spoofed)

    def forget_drops(self, sandbox_id: str) -> None:
        for reason in ("denied", "spoofed"):
            with contextlib.suppress(KeyError):
                self.egress_drops.remove(sandbox_id, reason)

    def observe(self, record: SandboxRecord) -> None:
        before = self._states.get(record.id)
        state = record.state
        if state is SandboxState.RUNNING and before is not SandboxState.RUNNING:
            self.launches.inc()
        if state is SandboxState.FAILED and before in (None, SandboxState.CREATED):
            self.errors.labels(ErrorCategory.START.value).inc()
        if record.live:
            self._states[record.id] = state
        else:
            self._states.pop(record.id, None)

    def refresh(self) -> None:
        live = self.manager.live_count() if self.manager is not None else 0
        usage = NodeUsage(
            sandboxes=live,
            cpu_utilisation=self._usage.cpu(),
            memory_utilisation=self._usage.memory(),
        )
        self.set_node(self.node_id, self.pool, usage, 0.0)
        self.set_depth({lane: LaneDepth(waiting=0, in_flight=0) for lane in LANES})
        self.creating.set(sum(1 for s in self._states.values() if s is SandboxState.CREATED))
        if self.manager is not None:
            self.teardowns.set(self.manager.teardowns_in_flight)
            failures = self.manager.teardown_failures
            self.teardown_failures.inc(failures - self._failures_seen)
            self._failures_seen = failures


class CountingStore(Store):
    """The server's SQLite store, telling the host's metrics about every record it writes."""

    def __init__(self, path: Path, metrics: HostMetrics) -> None:
        super().__init__(path)
        self.metrics = metrics

    def insert(self, record: SandboxRecord) -> SandboxRecord:
        inserted = super().insert(record)
        self.metrics.observe(inserted)
        return inserted

    def save(self, record: SandboxRecord) -> None:
        super().save(record)
        self.metrics.observe(record)


class MetricsPlugin:
    """Serves `metrics` at `/metrics` (see `tartarus.server.plugins`)."""

    def __init__(self, metrics: Instruments) -> None:
        self.metrics = metrics

    def middlewares(self) -> list[Middleware]:
        return []

    def route_tables(self) -> list[RouteTable]:
        return [routes]

    @asynccontextmanager
    async def running(self, manager: SandboxManager, app: web.Application) -> AsyncIterator[None]:
        app[METRICS] = self.metrics
        if isinstance(self.metrics, HostMetrics):
            self.metrics.manager = manager
            watcher = EgressDropWatcher(
                manager,
                manager.provider.networks,
                self.metrics,
                [self.metrics, *self.metrics.event_sinks],
            )
            manager.spawn(watcher.watch_forever)
        yield
