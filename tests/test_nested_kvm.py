"""The microVM suite on a KVM that runs Linux guests: inside a nested-KVM L1.

This host's /dev/kvm cannot run Linux guests, so every `kvm_full` test skips in the core
lane. Here one L1 (tests/support/nested_kvm.py: QEMU TCG with emulated SVM, this host's
root over 9p) boots once for the whole lane and runs those same tests with the real
orchestrator: `tartarus-vmm` boots the cached guest kernel with `tartarus-agent` as PID
1, exec, files, the overlay root, snapshot and restore, clones, the VMM's jail. Each
test here reports one file's inner results; a skip inside L1 counts as a failure, since
L1 is the host those tests are for.
"""

from __future__ import annotations

import shlex
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import nested_kvm
from tests.support.images import shared_template

# The lane's budget is 10 minutes on an idle 2-core machine (scripts/lanes.py reports an
# overrun; one L1 run takes about 3). L1 is killed when it is surely stuck: past its
# timeout, or silent longer than any inner test can be (the agent wait is 180 s).
L1_TIMEOUT_S = 12 * 60
L1_SILENCE_S = 6 * 60
# Two failures of QEMU's emulated SVM are not test results, and get one more try in a
# fresh L1, reported as such: L1 dying or wedging before its job ends (a panic in L1's own
# kernel), and a guest triple-faulting mid-boot with nothing on its console, which
# Firecracker's guests do in that L1 too (README, "nested-KVM lane"). On AMD, KVM resets a
# vCPU after a triple fault, so the VMM reports the reset vector. A deterministic fault
# fails both tries; any other failure is never rerun.
EMULATOR_FAULT = "triple fault at rip 0xfff0"
# The templates the inner tests boot from (tests/test_compat_microvm.py).
L1_TEMPLATES = ("python",)
L1_TRIES = 2
pytestmark = [pytest.mark.nested_kvm, pytest.mark.timeout(3 * L1_TIMEOUT_S + 120)]

ROOT = Path(__file__).resolve().parent.parent
# The files whose `kvm_full` tests run inside L1.
INNER_FILES = (
    "tests/test_selector.py",
    "tests/test_vmm.py",
    "tests/test_microvm_e2e.py",
    "tests/test_snapshots_microvm.py",
    "tests/test_compat_microvm.py",
)


@dataclass(frozen=True)
class InnerResult:
    outcome: str  # passed, failed, error or skipped
    seconds: float
    message: str


@dataclass(frozen=True)
class LaneRun:
    results: dict[str, InnerResult]
    console: Path
    seconds: float
    exit_code: int | None


def _parse_junit(path: Path) -> dict[str, InnerResult]:
    results: dict[str, InnerResult] = {}
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314 - our pytest's output
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or "") + "\n" + (node.text or "")
                break
        results[name] = InnerResult(outcome, float(case.get("time", 0)), message.strip())
    return results


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> LaneRun:
    if reason := nested_kvm.qemu_available():
        pytest.skip(reason)
    image = nested_kvm.cached_image()
    if image is None:
        pytest.skip(
            "no L1 image under ~/.cache/tartarus/nested (`make artefacts` prepares it with "
            "`python -m tests.support.nested_kvm prepare`)"
        )
    # L1 has no network, so it cannot build a template: what its tests take from the
    # template store is built (or found) here first. Tests of the core lane share that
    # store and may have rebuilt or pruned it since `make artefacts`.
    for template in L1_TEMPLATES:
        shared_template(template, ext4=True)
    start = time.monotonic()
    results, console, exit_code = _run_inside_l1(image, tmp_path_factory, INNER_FILES)
    suspects = sorted(
        n for n, r in results.items() if r.outcome == "failed" and EMULATOR_FAULT in r.message
    )
    if suspects:
        print(f"\nnested KVM lane: {EMULATOR_FAULT} in {suspects}; once more in a fresh L1")
        again, console, exit_code = _run_inside_l1(
            image, tmp_path_factory, [_node_id(n) for n in suspects]
        )
        for name in suspects:
            if name in again:
                first = results[name].message.splitlines()[0]
                results[name] = again[name]
                print(f"nested KVM lane: {name} {again[name].outcome} on its second try ({first})")
    return LaneRun(results, console, time.monotonic() - start, exit_code)


def _node_id(name: str) -> str:
    """`tests.test_x::test_y[p]` (as _parse_junit names it) → `tests/test_x.py::test_y[p]`."""
    module, test = name.split("::", 1)
    return f"{module.replace('.', '/')}.py::{test}"


def _run_inside_l1(
    image: nested_kvm.L1Image, tmp: pytest.TempPathFactory, tests: Sequence[str]
) -> tuple[dict[str, InnerResult], Path, int | None]:
    """Runs `tests` (files or node ids) with pytest inside one L1, booting a second L1
    when the first ends before its job does. Returns the results, console and job exit."""
    # One test at a time: some count every VMM process on the host. Guests boot in seconds
    # under nested emulation, not in milliseconds, hence the longer agent wait. Three
    # guests at once, not ten: with ten, L1's kernel once panicked in KVM's vCPU thread
    # (stack guard page hit in its page-fault handler) under QEMU 10.0.2.
    for attempt in range(1, L1_TRIES + 1):
        out = tmp.mktemp("l1")
        junit = out / "inner.xml"
        job = (
            f"cd {ROOT} && TARTARUS_GUEST_READY_TIMEOUT_S=180 TARTARUS_TEST_CONCURRENT_MICROVMS=3 "
            ".venv/bin/python -m pytest -p no:cacheprovider -p no:xdist -p no:schemathesis "
            f"-o addopts= -m kvm_full -v -rA --durations=0 --junitxml={junit} "
            f"--basetemp=/tmp/pt {' '.join(shlex.quote(t) for t in tests)}"
        )
        run = nested_kvm.boot(
            image, job, out, timeout_s=L1_TIMEOUT_S, silence_s=L1_SILENCE_S, keep=[ROOT]
        )
        print(f"\nnested KVM lane: L1 ran {run.seconds:.0f} s; console: {out / 'console.log'}")
        if run.exit_code is not None:
            break
        tail = "\n".join(run.console.splitlines()[-25:])
        print(f"nested KVM lane: L1 ended before its job did (try {attempt}):\n{tail}")
    results = _parse_junit(junit) if junit.exists() else {}
    return results, out / "console.log", run.exit_code


def test_l1_ran_the_inner_suite(lane: LaneRun) -> None:
    assert lane.results, (
        f"L1 produced no results (job exit {lane.exit_code}); console tail:\n"
        + "\n".join(lane.console.read_text().splitlines()[-40:])
    )


@pytest.mark.parametrize("path", INNER_FILES)
def test_kvm_full_tests_pass_inside_l1(lane: LaneRun, path: str) -> None:
    module = path.removesuffix(".py").replace("/", ".")
    mine = {n: r for n, r in lane.results.items() if n.startswith(module + "::")}
    assert mine, f"no kvm_full test of {path} ran inside L1 (console: {lane.console})"
    bad = {n: r for n, r in mine.items() if r.outcome != "passed"}
    report = "\n\n".join(f"{n}: {r.outcome}\n{r.message[-1500:]}" for n, r in bad.items())
    assert not bad, f"{len(bad)} of {len(mine)} failed or skipped inside L1:\n{report}"
