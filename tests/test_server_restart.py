"""Sandboxes that outlive their server: `kill -9` of `tartarus serve` with twenty
sandboxes running (gVisor, and the jail), and a new server on the same state directory
re-attaches to every one still running (gVisor's agents dial in again, the jail's
listen on); execs work, a background process carries on, its logs continue, one that
died meanwhile is reaped, and once they are deleted nothing is left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.network.namespaces import NETNS_DIR, NETNS_PREFIX
from tartarus.runtime.types import Backend
from tests.support.backends import LINUX_BACKENDS, available_backend
from tests.support.server import (
    Server,
    processes_mentioning,
    running_server,
    sandbox_base,
    start_server,
)

pytestmark = pytest.mark.timeout(600)

SANDBOXES = 20
COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; echo tick $i; sleep 0.1; done"


@pytest.fixture
def base() -> Iterator[Path]:
    with sandbox_base() as path:
        yield path


@pytest.fixture(params=LINUX_BACKENDS)
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    return available_backend(request, doctor_report)


def exec_out(server: Server, sandbox_id: str, cmd: str) -> str:
    r = server.json("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": cmd})
    assert r.status == 200, r.body
    out: str = r.json()["stdout"]
    return out


def count(server: Server, sandbox_id: str) -> int:
    return int(exec_out(server, sandbox_id, "cat /tmp/count").strip() or 0)


def leftovers(base: Path, ids: list[str]) -> list[str]:
    found = [f"process {pid}: {cmd}" for pid, cmd in processes_mentioning(str(base))]
    for sandbox_id in ids:
        found += [f"netns {p.name}" for p in NETNS_DIR.glob(f"{NETNS_PREFIX}*-{sandbox_id}")]
    return found


def test_kill_9_with_twenty_sandboxes_and_all_are_back_after_restart(
    backend: str, base: Path
) -> None:
    server = start_server(base)
    ids: list[str] = []
    try:
        for n in range(SANDBOXES):
            body = {"template": "base", "backend": backend, "timeout_s": 600}
            if n == 0:
                body["network"] = True
                body["trust"] = "trusted"
            r = server.json("POST", "/v1/sandboxes", body)
            assert r.status == 201, r.body
            ids.append(r.json()["id"])
        counter = ids[0]
        r = server.json(
            "POST",
            f"/v1/sandboxes/{counter}/exec",
            {"cmd": COUNTER, "background": True},
        )
        assert r.status == 202, r.body
        for sandbox_id in ids:
            exec_out(server, sandbox_id, f"echo {sandbox_id} > /tmp/mine")
        time.sleep(0.5)
        before = count(server, counter)
        assert before > 0
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    # One dies while no server is there: the restart reaps it and says so.
    gone = ids.pop()
    for pid, _ in processes_mentioning(gone):
        os.kill(pid, signal.SIGKILL)

    with running_server(base) as again:
        listed = again.raw("GET", "/v1/sandboxes?state=running&limit=500").json()["items"]
        assert {i["id"] for i in listed} == set(ids)
        info = again.raw("GET", f"/v1/sandboxes/{gone}").json()
        assert info["state"] == "failed" and "reaped on restart" in info["detail"], info
        for sandbox_id in ids:
            # Its own files, so its own sandbox: nothing was restarted or swapped.
            assert exec_out(again, sandbox_id, "cat /tmp/mine") == f"{sandbox_id}\n"
        # The counter ran on while no server was there, and still runs.
        after = count(again, counter)
        assert after > before
        time.sleep(0.5)
        assert count(again, counter) > after
        logs = again.raw("GET", f"/v1/sandboxes/{counter}/logs").body.decode()
        assert f"tick {before}" in logs and f"tick {after}" in logs
        # Its link to the host works as it did.
        assert "eth0" in exec_out(again, counter, "ip -o -4 addr")
        for sandbox_id in ids:
            assert again.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status in (200, 202, 204)
        again.teardowns_done()
        assert leftovers(base, [*ids, gone]) == []
    assert leftovers(base, [*ids, gone]) == []


def test_a_reattached_sandbox_keeps_its_quota_share_whatever_the_quota_says_now(
    base: Path, doctor_report: DoctorReport
) -> None:
    """A quota lowered while sandboxes run does not end them at a restart (no judge
    sits again), and their shares are held: the next create is refused."""
    verdict = doctor_report.backend("jail")
    if not verdict.available:
        pytest.skip(f"jail cannot run here (doctor): {verdict.reason}")
    server = start_server(base)
    try:
        ids = []
        for _ in range(2):
            r = server.json("POST", "/v1/sandboxes", {"template": "base", "backend": "jail"})
            assert r.status == 201, r.body
            ids.append(r.json()["id"])
        policy = "name: global\nspec: {resources: {max_sandboxes: 1}}\n"
        assert server.json("PUT", "/v1/policies/global", {"document": policy}).status == 200
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)
    with running_server(base) as again:
        listed = again.raw("GET", "/v1/sandboxes?state=running").json()["items"]
        assert {i["id"] for i in listed} == set(ids)
        refused = again.json("POST", "/v1/sandboxes", {"template": "base", "backend": "jail"})
        assert refused.status == 429, refused.body
        for sandbox_id in ids:
            assert again.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status == 204
        created = again.json("POST", "/v1/sandboxes", {"template": "base", "backend": "jail"})
        assert created.status == 201, created.body
        assert again.raw("DELETE", f"/v1/sandboxes/{created.json()['id']}").status == 204
    assert leftovers(base, ids) == []


def test_an_upgrade_restart_with_leave_sandboxes_keeps_them(
    base: Path, doctor_report: DoctorReport
) -> None:
    """`tartarus serve --leave-sandboxes` stopped gracefully (what an upgrade's restart
    sends) leaves its sandboxes running, and the next server takes them back."""
    backends = [b for b in ("gvisor", "jail") if doctor_report.backend(b).available]
    if not backends:
        pytest.skip("neither gvisor nor the jail can run here (doctor)")
    server = start_server(base, "--leave-sandboxes")
    ids = []
    for backend in backends:
        r = server.json("POST", "/v1/sandboxes", {"template": "base", "backend": backend})
        assert r.status == 201, r.body
        ids.append(r.json()["id"])
        r = server.json(
            "POST", f"/v1/sandboxes/{ids[-1]}/exec", {"cmd": COUNTER, "background": True}
        )
        assert r.status == 202, r.body
    time.sleep(0.5)
    before = {i: count(server, i) for i in ids}
    assert server.stop() == 0
    assert all(processes_mentioning(i) for i in ids), "a sandbox was stopped"
    with running_server(base) as again:
        for sandbox_id in ids:
            info = again.raw("GET", f"/v1/sandboxes/{sandbox_id}").json()
            assert info["state"] == "running", info
            assert count(again, sandbox_id) > before[sandbox_id]
    # Without the flag, the graceful stop stops them.
    for sandbox_id in ids:
        assert processes_mentioning(sandbox_id) == []
    assert leftovers(base, ids) == []
