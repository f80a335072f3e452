"""Scaler metrics on a single host: `tartarus serve` (no fleet) serves `/metrics` in the
Prometheus text format with the same names as a fleet's API servers: this host's CPU
and memory use and sandboxes, the lanes (empty: one host has no queue), launches and
start errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tartarus.fleet.host_metrics import CountingStore, HostMetrics
from tartarus.host.doctor import DoctorReport
from tartarus.runtime.types import SandboxState
from tests.support.fleet import SANDBOX, queued_record, require_jail
from tests.support.server import Server, running_server

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def node_labels(samples: Samples) -> dict[str, str]:
    (labels,) = [dict(k[1]) for k in samples if k[0] == "tartarus_node_cpu_utilisation"]
    return labels


def get_metrics(server: Server) -> Samples:
    reply = server.raw("GET", "/metrics")
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return scrape(reply.body.decode())


def test_single_host_serve_exposes_scaler_metrics(
    tmp_path: Path, doctor_report: DoctorReport
) -> None:
    require_jail(doctor_report)
    with running_server(tmp_path / "srv") as server:
        before = get_metrics(server)
        assert metric(before, "tartarus_sandbox_launches_total") == 0
        created = server.json(
            "POST", "/v1/sandboxes", {**SANDBOX, "resources": {"vcpus": 0.1, "memory_mib": 64}}
        )
        assert created.status == 201, created.body
        samples = get_metrics(server)
        assert metric(samples, "tartarus_sandbox_launches_total") == 1
        labels = node_labels(samples)
        assert labels["pool"] == "general" and labels["node"]
        assert 0 <= metric(samples, "tartarus_node_cpu_utilisation", **labels) <= 1
        assert 0 < metric(samples, "tartarus_node_memory_utilisation", **labels) < 1
        assert metric(samples, "tartarus_node_sandboxes", **labels) == 1
        for lane in ("swift", "main", "deep"):
            for state in ("waiting", "in_flight"):
                assert metric(samples, "tartarus_queue_depth", lane=lane, state=state) == 0
        assert metric(samples, "tartarus_sandboxes_creating") == 0
        assert server.raw("DELETE", f"/v1/sandboxes/{created.json()['id']}").status == 204
        assert metric(get_metrics(server), "tartarus_node_sandboxes", **labels) == 0


def test_launches_and_start_errors_are_counted_as_records_change(tmp_path: Path) -> None:
    metrics = HostMetrics("node-x")
    store = CountingStore(tmp_path / "state.db", metrics)
    try:
        failing = store.insert(queued_record("sb-0000000000000001"))
        running = store.insert(queued_record("sb-0000000000000002"))
        metrics.refresh()
        samples = scrape(metrics.render().decode())
        assert metric(samples, "tartarus_sandboxes_creating") == 2
        failing.state = SandboxState.FAILED
        store.save(failing)
        running.state = SandboxState.RUNNING
        store.save(running)
        store.save(running)  # saved again while running: one launch
        running.state = SandboxState.FAILED  # failed after it ran: not a start error
        store.save(running)
        metrics.refresh()
        samples = scrape(metrics.render().decode())
        assert metric(samples, "tartarus_sandbox_launches_total") == 1
        assert metric(samples, "tartarus_errors_total", category="start") == 1
        assert metric(samples, "tartarus_sandboxes_creating") == 0
    finally:
        store.close()
