"""The short soak and chaos runs (the `soak` lane of `make test`): a few hundred
sandboxes through a real server on the jail and gVisor, each fault once
(tests/support/soak.py), the state directory on a small filesystem of its own that one
fault fills; and a fleet of two API servers and three node agents over a durable Redis,
each of them killed once (tests/support/fleet_soak.py). Nothing acknowledged may be
lost, nothing may leak, the audit chain must verify and the quota must come back whole.
`python -m benches.bench_soak` (with `--fleet`) is the long run."""

from __future__ import annotations

import json

import anyio
import msgspec
import pytest

from tartarus.host.doctor import DoctorReport
from tests.conftest import require_root
from tests.support.fleet_soak import FLEET_FAULTS, fleet_soak
from tests.support.server import sandbox_base
from tests.support.soak import SoakPlan, SoakReport, soak

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


def assert_nothing_lost_or_leaked(report: SoakReport) -> None:
    print(json.dumps(msgspec.to_builtins(report), indent=2))
    assert report.errors == {}, (report.errors, report.error_details)
    assert report.server_errors == {}, report.server_errors
    assert report.lost == [], report.lost
    assert {kind: left for kind, left in report.leaks.items() if left} == {}
    inv = report.invariants
    assert inv["audit_chain_ok"], inv["audit_problems"]
    assert inv["every_create_admitted"], inv
    assert inv["records_not_final"] == []
    assert inv["quota_back_to_zero"]


def test_a_short_soak_loses_and_leaks_nothing(doctor_report: DoctorReport) -> None:
    require_root()
    backends = tuple(b for b in ("jail", "gvisor") if doctor_report.backend(b).available)
    if not backends:
        pytest.skip("neither the jail nor gvisor can run here (doctor)")
    plan = SoakPlan(sandboxes=300, concurrency=16, backends=backends, max_sandboxes=24)
    with sandbox_base() as base:
        report = anyio.run(soak, plan, base)
    assert_nothing_lost_or_leaked(report)
    assert set(report.faults) == {"server-kill", "sandbox-kill", "slow-client", "disk-full"}
    # While the disk was full, what failed said so (a problem, never a 500 or a cut
    # connection); the SDK and the run retried what the server asked them to.
    for fault, kinds in report.fault_errors.items():
        bad = [k for k in kinds if not k.split(": ", 1)[1][:1].isdigit() or " 500 " in f" {k}"]
        assert bad == [], (fault, kinds)
    # The fault did kill something on each backend, and the next exec is refused: the
    # sandbox stopped with its host process (a jail's agent, left unsupervised, would
    # still answer, and is not asked).
    for backend, seen in report.faults["sandbox-kill"].items():
        assert seen["killed_pids"] >= 1, (backend, seen)
        assert seen["exec_after"] == "409 sandbox-not-running", (backend, seen)
    # A reader that never reads holds the server's memory to its buffers.
    assert report.faults["slow-client"]["growth_mib"] < 128, report.faults


def test_a_fleet_soak_through_killed_servers_agents_and_redis_loses_nothing(
    doctor_report: DoctorReport,
) -> None:
    require_root()
    backends = tuple(b for b in ("jail", "gvisor") if doctor_report.backend(b).available)
    if not backends:
        pytest.skip("neither the jail nor gvisor can run here (doctor)")
    plan = SoakPlan(
        sandboxes=150,
        concurrency=12,
        backends=backends,
        faults=FLEET_FAULTS,
        max_sandboxes=24,
        networked_every=0,
    )
    with sandbox_base() as base:
        report = anyio.run(fleet_soak, plan, base)
    assert_nothing_lost_or_leaked(report)
    assert set(report.faults) == set(FLEET_FAULTS)
    # Redis came back with what it had acknowledged (appendfsync always), and the API
    # servers rode out its restart without a 500 (asserted above: server_errors).
    assert report.faults["redis-kill"]["appendfsync"] == "always"
    # The only failures the clients saw during the faults are of the sandboxes the
    # killed agent ran: their node was gone (502) or they were declared lost (409).
    for fault, kinds in report.fault_errors.items():
        assert fault == "agent-kill", (report.fault_errors, report.error_details)
        bad = [k for k in kinds if k.split(": ", 1)[1][:3] not in ("502", "409")]
        assert bad == [], {k: report.error_details.get(k) for k in bad}
