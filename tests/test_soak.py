"""The short soak and chaos run (the `soak` lane of `make test`): a few hundred sandboxes
through a real server on the jail and gVisor, each fault once (tests/support/soak.py),
the state directory on a small filesystem of its own that one fault fills.
Nothing acknowledged may be lost, nothing may leak, the audit chain must verify and the
quota must come back whole. `python -m benches.bench_soak` is the long run."""

from __future__ import annotations

import json

import anyio
import msgspec
import pytest

from tartarus.host.doctor import DoctorReport
from tests.conftest import require_root
from tests.support.server import sandbox_base
from tests.support.soak import SoakPlan, soak

pytestmark = [pytest.mark.soak, pytest.mark.timeout(900)]


def test_a_short_soak_loses_and_leaks_nothing(doctor_report: DoctorReport) -> None:
    require_root()
    backends = tuple(b for b in ("jail", "gvisor") if doctor_report.backend(b).available)
    if not backends:
        pytest.skip("neither the jail nor gvisor can run here (doctor)")
    plan = SoakPlan(sandboxes=300, concurrency=16, backends=backends, max_sandboxes=24)
    with sandbox_base() as base:
        report = anyio.run(soak, plan, base)
    print(json.dumps(msgspec.to_builtins(report), indent=2))
    assert report.errors == {}, report.errors
    assert report.lost == [], report.lost
    assert {kind: left for kind, left in report.leaks.items() if left} == {}
    inv = report.invariants
    assert inv["audit_chain_ok"], inv["audit_problems"]
    assert inv["every_create_admitted"], inv
    assert inv["records_not_final"] == []
    assert inv["quota_back_to_zero"]
    assert set(report.faults) == {"server-kill", "sandbox-kill", "slow-client", "disk-full"}
    # While the disk was full, what failed said so (a problem, never a 500 or a cut
    # connection); the SDK and the run retried what the server asked them to.
    for fault, kinds in report.fault_errors.items():
        bad = [k for k in kinds if not k.split(": ", 1)[1][:1].isdigit() or " 500 " in f" {k}"]
        assert bad == [], (fault, kinds)
    # The fault did kill something on each backend. What the next exec saw is reported,
    # not asserted: gVisor's sandbox ends with runsc (409), while a jail whose supervisor
    # was killed may run on with its agent still answering (exit 0).
    for backend, seen in report.faults["sandbox-kill"].items():
        assert seen["killed_pids"] >= 1, (backend, seen)
    # A reader that never reads holds the server's memory to its buffers.
    assert report.faults["slow-client"]["growth_mib"] < 128, report.faults
