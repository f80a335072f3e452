"""Runs the pytest lanes of `make test` and prints the time of every stage and lane.

Each lane is one pytest run over a marker expression, with its own time budget (the
README's "Testing" section lists them). Stages recorded by scripts/stage (system
packages, the lock, the wheel, lint, types, Rust) are summed into the "setup and Rust
build" lane. The run ends with one line that counts every lane's tests, so the totals
are the last thing printed:

    .venv/bin/python scripts/lanes.py [--only LANE] [PYTEST ARG ...]

Standard library only: it must run before anything else is known to work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMPS = ROOT / ".stamps"
STAGE_LOG = Path(os.environ.get("TARTARUS_STAGE_LOG", STAMPS / "stages.tsv"))
SETUP_LANE = "setup"
ARTEFACTS_LANE = "artefacts"
NO_TESTS_COLLECTED = 5


@dataclass(frozen=True)
class Lane:
    name: str
    title: str
    markers: str
    budget_min: float
    # Parallel workers: tests that share a server or a build say so with
    # `@pytest.mark.xdist_group`, and `--dist loadgroup` keeps each group on one worker.
    workers: int = 1


# The marker names are the ones tests use: `nested_kvm`, `kubernetes`, `vscode`, `soak`.
SPECIAL = ("nested_kvm", "kubernetes", "vscode", "soak")
LANES = (
    Lane("core", "core pytest", "not (" + " or ".join(SPECIAL) + ")", 20, workers=2),
    Lane("nested_kvm", "nested-KVM lane", "nested_kvm", 10),
    Lane("kubernetes", "Kubernetes lane", "kubernetes", 3),
    Lane("vscode", "VS Code lane", "vscode", 3),
    Lane("soak", "short soak", "soak", 3),
)
SETUP_BUDGET_MIN = 12
# Cached artefacts (kernel, templates): seconds when warm; on a new machine they are
# built once (the kernel ~6-10 min, the python template ~2 min on 2 cores).
ARTEFACTS_BUDGET_MIN = 2


@dataclass
class Outcome:
    seconds: float = 0.0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    ran: bool = False
    exit_code: int = 0


def _junit_counts(path: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) from a pytest junit XML file."""
    root = ET.parse(path).getroot()  # noqa: S314 - our own pytest's output
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def run_lane(lane: Lane, extra: list[str]) -> Outcome:
    junit = STAMPS / f"junit-{lane.name}.xml"
    junit.unlink(missing_ok=True)
    cmd = [
        str(ROOT / ".venv" / "bin" / "pytest"),
        "-m",
        lane.markers,
        f"--junitxml={junit}",
        "--durations=25",
    ]
    workers = int(os.environ.get("TARTARUS_TEST_WORKERS", lane.workers))
    if workers > 1:
        cmd += ["-n", str(workers), "--dist", "loadgroup"]
    # A short base for tmp_path: unix socket paths under it (a VMM's api.sock) must stay
    # within 108 bytes, and xdist adds a `popen-gwN/` level to every test's directory.
    basetemp = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    cmd.append(f"--basetemp={basetemp}")
    print(f"\n===== {lane.title}: pytest -m '{lane.markers}' (workers: {workers})", flush=True)
    start = time.monotonic()
    rc = subprocess.run([*cmd, *extra], cwd=ROOT, check=False).returncode
    out = Outcome(seconds=time.monotonic() - start, exit_code=rc)
    if rc in (0, NO_TESTS_COLLECTED):
        shutil.rmtree(basetemp, ignore_errors=True)  # kept after a failure, to look at
    if rc == NO_TESTS_COLLECTED:
        out.exit_code = 0
        return out
    out.ran = True
    if junit.exists():
        out.passed, out.failed, out.skipped = _junit_counts(junit)
    elif rc != 0:
        out.failed = 1  # pytest died before writing its report: count the lane as failed
    return out


def _stages() -> list[tuple[str, str, float, int]]:
    if not STAGE_LOG.exists():
        return []
    rows = []
    for line in STAGE_LOG.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 4:
            rows.append((parts[0], parts[1], float(parts[2]), int(parts[3])))
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:5.1f} min"


def summary(outcomes: dict[str, Outcome]) -> None:
    stages = _stages()
    print("\n===== time per stage")
    for name, group, secs, rc in stages:
        flag = "" if rc == 0 else f"  (exit {rc})"
        print(f"  {name:<24} {group:<10} {secs:8.1f} s{flag}")
    print("\n===== time per lane (budget on a warm cache)")
    setup = sum(secs for _, group, secs, _ in stages if group == SETUP_LANE)
    over = setup > SETUP_BUDGET_MIN * 60
    mark = "  OVER BUDGET" if over else ""
    print(f"  {'setup and Rust build':<22} {_minutes(setup)}  (<= {SETUP_BUDGET_MIN} min){mark}")
    built = sum(secs for _, group, secs, _ in stages if group == ARTEFACTS_LANE)
    mark = (
        "  OVER BUDGET (a cold cache builds them once)" if built > ARTEFACTS_BUDGET_MIN * 60 else ""
    )
    print(f"  {'cached artefacts':<22} {_minutes(built)}  (<= {ARTEFACTS_BUDGET_MIN} min){mark}")
    total = setup + built
    for lane in LANES:
        got = outcomes.get(lane.name)
        if got is None:
            status = "not run"
        elif not got.ran:
            status = "no tests in this lane yet"
        else:
            status = f"{got.passed} passed, {got.failed} failed, {got.skipped} skipped"
        secs = got.seconds if got else 0.0
        total += secs
        mark = "  OVER BUDGET" if secs > lane.budget_min * 60 else ""
        budget = f"(<= {lane.budget_min:g} min)"
        print(f"  {lane.title:<22} {_minutes(secs)}  {budget:<13} {status}{mark}")
    print(f"  {'total':<22} {_minutes(total)}  (<= 50 min warm, <= 85 min on a new machine)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[lane.name for lane in LANES], action="append")
    args, extra = parser.parse_known_args()
    outcomes: dict[str, Outcome] = {}
    for lane in LANES:
        if args.only and lane.name not in args.only:
            continue
        outcomes[lane.name] = run_lane(lane, extra)
    summary(outcomes)
    passed = sum(o.passed for o in outcomes.values())
    failed = sum(o.failed for o in outcomes.values())
    skipped = sum(o.skipped for o in outcomes.values())
    worst = max((o.exit_code for o in outcomes.values()), default=0)
    # The last line: every lane's tests counted together.
    print(f"\ntests: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if (failed or worst) else 0


if __name__ == "__main__":
    sys.exit(main())
