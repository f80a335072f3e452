"""Pause and resume (Hypnos), end to end: a real `tartarus serve` process, real runsc
checkpoints and real cgroup freezes.

gVisor: a sandbox running a counter is paused and resumed ten times and the counter
carries on from where it was; a pause leaves no process of the sandbox on the host; a
paused sandbox survives `kill -9` of the server and a move of its state directory; a
pause that cannot write its snapshot (a full disk) is refused and the sandbox runs on;
any call that needs it running resumes it; its timeout or idleness can pause it. The
jail freezes in place, and stays frozen across `kill -9` of the server.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport, run_doctor
from tests.conftest import REPO_ROOT
from tests.support.server import (
    Server,
    cli,
    processes_mentioning,
    running_server,
    sandbox_base,
    server_env,
    start_server,
)

pytestmark = pytest.mark.timeout(900)

# Renamed into place, so a reader never sees the file half-written.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count;"
    " sleep 0.05; done"
)


def require(backend: str) -> None:
    verdict = run_doctor(load_settings()).backend(backend)
    if not verdict.available:
        pytest.skip(f"{backend} cannot run here: {verdict.reason}")


@pytest.fixture
def base() -> Iterator[Path]:
    with sandbox_base() as path:
        yield path


def create(server: Server, backend: str, **extra: Any) -> str:
    r = server.json("POST", "/v1/sandboxes", {"backend": backend, "timeout_s": 600, **extra})
    assert r.status == 201, r.body
    sandbox_id: str = r.json()["id"]
    return sandbox_id


def run(server: Server, sandbox_id: str, cmd: str, **extra: Any) -> dict[str, Any]:
    r = server.json("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": cmd, **extra})
    assert r.status == (202 if extra.get("background") else 200), r.body
    result: dict[str, Any] = r.json()
    return result


def count(server: Server, sandbox_id: str) -> int:
    deadline = time.monotonic() + 30
    while True:
        out = run(server, sandbox_id, "cat /tmp/count 2>/dev/null")["stdout"].strip()
        if out.isdigit():
            return int(out)
        assert time.monotonic() < deadline, "the counter never started"
        time.sleep(0.05)


def counts_on(server: Server, sandbox_id: str, past: int) -> int:
    """The counter once it moved past `past` (within 30 s)."""
    deadline = time.monotonic() + 30
    value = count(server, sandbox_id)
    while value <= past and time.monotonic() < deadline:
        time.sleep(0.1)
        value = count(server, sandbox_id)
    return value


def verb(server: Server, sandbox_id: str, action: str) -> dict[str, Any]:
    r = server.raw("POST", f"/v1/sandboxes/{sandbox_id}/{action}")
    assert r.status == 200, r.body
    info: dict[str, Any] = r.json()
    return info


def pause_snapshots(server: Server) -> list[dict[str, Any]]:
    items = server.raw("GET", "/v1/snapshots?limit=500").json()["items"]
    return [s for s in items if s["purpose"] == "pause"]


def test_gvisor_pause_resume_ten_times_keeps_processes_and_frees_the_host(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        sb = create(s, "gvisor")
        run(s, sb, COUNTER, background=True)
        before = count(s, sb)
        assert processes_mentioning(f"tt-{sb}-"), "the sandbox's runsc processes"
        for cycle in range(10):
            at_pause = count(s, sb)
            info = verb(s, sb, "pause")
            assert info["state"] == "paused" and info["expires_at"] is None, info
            assert info["paused_at"] is not None and 0 < info["timeout_left_s"] <= 600, info
            # Nothing of it runs on the host: its memory and processes are freed.
            assert processes_mentioning(f"tt-{sb}-") == [], f"cycle {cycle}"
            again = verb(s, sb, "pause")  # pausing a paused sandbox changes nothing
            assert again["state"] == "paused"
            assert s.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "paused"
            assert len(pause_snapshots(s)) == 1
            info = verb(s, sb, "resume")
            assert info["state"] == "running" and info["expires_at"] is not None, info
            # The counter goes on from where it was: the same process, not a new one.
            resumed = count(s, sb)
            assert resumed >= at_pause, (cycle, at_pause, resumed)
            assert counts_on(s, sb, resumed) > resumed, f"cycle {cycle}: the counter stopped"
            assert pause_snapshots(s) == [], "the snapshot goes once the sandbox runs"
        assert count(s, sb) > before
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
    assert processes_mentioning(str(base)) == []


def test_gvisor_paused_sandbox_survives_kill_9_and_delete_removes_its_snapshot(
    base: Path,
) -> None:
    require("gvisor")
    s = start_server(base)
    try:
        sb = create(s, "gvisor")
        run(s, sb, "echo kept > /root/note")
        run(s, sb, COUNTER, background=True)
        at_pause = count(s, sb)
        paused = verb(s, sb, "pause")
        left = paused["detail"]
        assert paused["state"] == "paused", left
    finally:
        s.process.send_signal(signal.SIGKILL)
        s.process.wait(timeout=30)
    assert processes_mentioning(str(base)) == []
    with running_server(base) as again:
        info = again.raw("GET", f"/v1/sandboxes/{sb}").json()
        assert info["state"] == "paused", info
        listed = cli(again, "ps").stdout.decode()
        assert sb in listed and "paused" in listed, listed
        info = verb(again, sb, "resume")
        assert info["state"] == "running"
        assert run(again, sb, "cat /root/note")["stdout"] == "kept\n"
        assert counts_on(again, sb, at_pause) > at_pause
        # Paused again, then deleted: its snapshot goes with it.
        verb(again, sb, "pause")
        assert len(pause_snapshots(again)) == 1
        snap = pause_snapshots(again)[0]["id"]
        refused = again.raw("DELETE", f"/v1/snapshots/{snap}")
        assert refused.status == 409 and sb in refused.json()["detail"]
        assert again.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
        assert again.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "stopped"
        assert pause_snapshots(again) == []
        assert verb_status(again, sb, "resume") == 409
    assert processes_mentioning(str(base)) == []


def test_gvisor_paused_sandbox_resumes_on_a_server_whose_state_directory_moved(
    base: Path,
) -> None:
    """What a host move looks like: the server is gone (every process of ours killed),
    its state directory is moved, and a new server started there resumes the sandbox."""
    require("gvisor")
    first, moved = base / "a", base / "b"
    s = start_server(first)
    try:
        sb = create(s, "gvisor")
        run(s, sb, "echo kept > /root/note")
        run(s, sb, COUNTER, background=True)
        at_pause = count(s, sb)
        assert verb(s, sb, "pause")["state"] == "paused"
    finally:
        s.process.send_signal(signal.SIGKILL)
        s.process.wait(timeout=30)
    assert processes_mentioning(str(first)) == []
    first.rename(moved)
    with running_server(moved) as again:
        assert verb(again, sb, "resume")["state"] == "running"
        assert run(again, sb, "cat /root/note")["stdout"] == "kept\n"
        assert counts_on(again, sb, at_pause) > at_pause
        assert again.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
    assert processes_mentioning(str(base)) == []


def verb_status(server: Server, sandbox_id: str, action: str) -> int:
    return server.raw("POST", f"/v1/sandboxes/{sandbox_id}/{action}").status


def test_gvisor_pause_on_a_full_disk_is_refused_and_the_sandbox_runs_on(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        sb = create(s, "gvisor")
        run(s, sb, COUNTER, background=True)
        start = count(s, sb)
        # Snapshots are written under the image store's staging directory: 64 KiB.
        staging = s.state_dir / "images" / "tmp"
        mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(staging)]
        subprocess.run(mount, check=True)
        try:
            r = s.raw("POST", f"/v1/sandboxes/{sb}/pause")
        finally:
            subprocess.run(["umount", "-l", str(staging)], check=True)
        assert r.status == 409, r.body
        problem = r.json()
        assert problem["type"].endswith("pause-failed"), problem
        assert "no space left on device" in problem["detail"], problem
        assert s.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "running"
        assert counts_on(s, sb, start) > start, "the sandbox stopped"
        # Nothing lost: it pauses and resumes once there is room.
        verb(s, sb, "pause")
        verb(s, sb, "resume")
        assert counts_on(s, sb, start) > start
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def frozen_states(sandbox_id: str) -> set[str]:
    """`frozen` of cgroup.events of the v2 cgroups of the sandbox's processes."""
    states = set()
    for pid, _ in processes_mentioning(f"{sandbox_id}/config"):
        for child in descendants(pid):
            try:
                lines = Path(f"/proc/{child}/cgroup").read_text().splitlines()
            except OSError:
                continue
            path = next((line[3:] for line in lines if line.startswith("0::")), None)
            if path is None or path == "/":
                continue
            for root in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
                events = root / path.lstrip("/") / "cgroup.events"
                if events.is_file():
                    for line in events.read_text().splitlines():
                        if line.startswith("frozen "):
                            states.add(line.split()[1])
    return states


def test_jail_pause_freezes_in_place_and_the_cli_says_so(base: Path) -> None:
    require("jail")
    with running_server(base) as s:
        sb = create(s, "jail", trust="trusted")
        run(s, sb, COUNTER, background=True)
        counts_on(s, sb, 0)
        assert frozen_states(sb) == {"0"}
        out = cli(s, "pause", sb)
        assert out.returncode == 0, out.stderr
        assert out.stdout.decode() == f"{sb} paused\n"
        # The processes are still there, frozen, memory and all.
        assert frozen_states(sb) == {"1"}
        out = cli(s, "resume", sb, "--json")
        assert out.returncode == 0, out.stderr
        assert '"state": "running"' in out.stdout.decode()
        assert frozen_states(sb) == {"0"}
        after = count(s, sb)
        assert counts_on(s, sb, after) > after
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
    assert processes_mentioning(str(base)) == []


def test_a_frozen_jail_stays_paused_across_kill_9_and_resumes(base: Path) -> None:
    require("jail")
    s = start_server(base)
    try:
        sb = create(s, "jail", trust="trusted")
        run(s, sb, COUNTER, background=True)
        at_pause = counts_on(s, sb, 0)
        assert verb(s, sb, "pause")["state"] == "paused"
    finally:
        s.process.send_signal(signal.SIGKILL)
        s.process.wait(timeout=30)
    with running_server(base) as again:
        info = again.raw("GET", f"/v1/sandboxes/{sb}").json()
        assert info["state"] == "paused", info
        assert frozen_states(sb) == {"1"}
        assert verb(again, sb, "resume")["state"] == "running"
        assert counts_on(again, sb, at_pause) > at_pause
        assert again.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
    assert processes_mentioning(str(base)) == []


def test_pause_and_resume_of_unknown_or_ended_sandboxes(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        for action in ("pause", "resume"):
            r = s.raw("POST", f"/v1/sandboxes/sb-0000000000000000/{action}")
            assert r.status == 404, r.body
        sb = create(s, "gvisor")
        assert verb(s, sb, "resume")["state"] == "running"  # resuming a running one: as is
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
        for action in ("pause", "resume"):
            r = s.raw("POST", f"/v1/sandboxes/{sb}/{action}")
            assert r.status == 409, r.body
            assert "stopped" in r.json()["detail"]
        out = cli(s, "pause", "sb-0000000000000000")
        assert out.returncode != 0
        assert b"Traceback" not in out.stderr and b"not found" in out.stderr, out.stderr


def test_the_sdk_program_of_the_docs_runs(base: Path) -> None:
    """docs/lifecycle.md's Python program, as written, against a server of its own."""
    require("gvisor")
    doc = (REPO_ROOT / "docs" / "lifecycle.md").read_text()
    program = doc.split("## From Python\n\n```python\n", 1)[1].split("```", 1)[0]
    with running_server(base) as s:
        done = subprocess.run(
            [sys.executable, "-c", program],
            env=dict(s.env, TARTARUS_URL=s.url),
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode() == "before\n\n"


def test_a_call_that_needs_it_running_resumes_a_paused_sandbox(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        sb = create(s, "gvisor")
        run(s, sb, "echo kept > /tmp/note")
        verb(s, sb, "pause")
        r = s.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": "cat /tmp/note"})
        assert r.status == 200, r.body
        assert r.json()["stdout"] == "kept\n"
        timing = r.headers["server-timing"]
        assert timing.startswith("resume;dur="), timing
        assert float(timing.removeprefix("resume;dur=")) > 0
        assert s.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "running"
        # A call to a running sandbox says nothing of a resume.
        again = s.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": "true"})
        assert "server-timing" not in again.headers
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204


def wait_state(server: Server, sandbox_id: str, state: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info: dict[str, Any] = server.raw("GET", f"/v1/sandboxes/{sandbox_id}").json()
        if info["state"] == state:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.1)


def test_timeout_and_idleness_pause_when_asked(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        timed = create(s, "gvisor", timeout_s=2, on_timeout="pause")
        idle = create(s, "gvisor", auto_pause_after_s=2)
        killed = create(s, "gvisor", timeout_s=2)
        shown = s.raw("GET", f"/v1/sandboxes/{idle}").json()
        assert (shown["on_timeout"], shown["auto_pause_after_s"]) == ("kill", 2), shown
        run(s, timed, "echo timed > /tmp/note")
        run(s, idle, "echo idle > /tmp/note")
        # Paused by its timeout: it will have its whole timeout again.
        assert wait_state(s, timed, "paused", 60)["timeout_left_s"] == 2
        wait_state(s, idle, "paused", 60)
        assert wait_state(s, killed, "stopped", 60)["detail"] == "timed out"
        # Both come back as they were; the timed-out one with its whole timeout again.
        assert run(s, timed, "cat /tmp/note")["stdout"] == "timed\n"
        assert run(s, idle, "cat /tmp/note")["stdout"] == "idle\n"
        info = s.raw("GET", f"/v1/sandboxes/{timed}").json()
        assert info["state"] == "running" and info["expires_at"] is not None
        # A call is activity until it ends: a 4 s command outlasts the 2 s idle period.
        assert run(s, idle, "sleep 4; echo done")["stdout"] == "done\n"
        assert s.raw("GET", f"/v1/sandboxes/{idle}").json()["state"] == "running"
        # Idle again: paused again.
        wait_state(s, idle, "paused", 60)
        for sb in (timed, idle):
            assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
    assert processes_mentioning(str(base)) == []


def test_deleting_a_paused_sandbox_that_asked_for_a_checkpoint_keeps_it(base: Path) -> None:
    require("gvisor")
    with running_server(base) as s:
        sb = create(s, "gvisor", checkpoint_on_stop=True)
        run(s, sb, "echo kept > /root/note")
        verb(s, sb, "pause")
        assert s.raw("DELETE", f"/v1/sandboxes/{sb}").status == 204
        assert pause_snapshots(s) == []
        items = s.raw("GET", "/v1/snapshots?limit=500").json()["items"]
        kept = [i for i in items if i["source_sandbox"] == sb]
        assert [i["purpose"] for i in kept] == ["terminate"], kept
        # It is the sandbox as it stopped: a restore finds its file.
        r = s.json("POST", f"/v1/snapshots/{kept[0]['id']}/restore", {})
        assert r.status == 201, r.body
        copy = r.json()["id"]
        assert run(s, copy, "cat /root/note")["stdout"] == "kept\n"
        assert s.raw("DELETE", f"/v1/sandboxes/{copy}").status == 204


def test_a_sandbox_paused_past_the_retention_is_deleted_with_its_snapshot(
    base: Path, doctor_report: DoctorReport
) -> None:
    backends = [b for b in ("gvisor", "jail") if doctor_report.backend(b).available]
    if not backends:
        pytest.skip("neither gvisor nor the jail can run here (doctor)")
    env = server_env(base, TARTARUS_PAUSED_RETENTION_S="2")
    with running_server(base, env=env) as s:
        ids = [create(s, backend) for backend in backends]
        for sb in ids:
            assert verb(s, sb, "pause")["state"] == "paused"
        deadline = time.monotonic() + 30
        for sb in ids:
            while (info := s.raw("GET", f"/v1/sandboxes/{sb}").json())["state"] == "paused":
                assert time.monotonic() < deadline, info
                time.sleep(0.2)
            assert info["state"] == "stopped", info
            assert info["detail"] == "paused for longer than 2 s; deleted", info
            assert info["ending"] == "killed", info
        assert pause_snapshots(s) == []
    assert processes_mentioning(str(base)) == []
