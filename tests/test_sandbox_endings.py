"""How a sandbox ended (Thanatos), as its record keeps it: killed at once, stopped
within its grace period, killed after it, timed out, or gone by itself. Real servers
and sandboxes on the jail and gVisor."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.runtime.types import Backend
from tests.support.backends import LINUX_BACKENDS, available_backend
from tests.support.server import Server, processes_mentioning, running_server, short_dir

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", params=LINUX_BACKENDS)
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    return available_backend(request, doctor_report)


@pytest.fixture(scope="module")
def server(backend: str) -> Iterator[Server]:
    with short_dir() as base, running_server(base) as s:
        yield s


def create(server: Server, backend: str, **extra: Any) -> str:
    body = {"template": "base", "backend": backend, "timeout_s": 120, **extra}
    r = server.json("POST", "/v1/sandboxes", body)
    assert r.status == 201, r.body
    sandbox_id: str = r.json()["id"]
    return sandbox_id


def background(server: Server, sandbox_id: str, cmd: str) -> None:
    r = server.json("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": cmd, "background": True})
    assert r.status == 202, r.body


def ignore_sigterm(server: Server, sandbox_id: str) -> None:
    """Starts a process that outlives any grace period."""
    # `trap ''` ignores the signal, and `sleep` inherits that; the file says the trap
    # is set (an exec's reply comes when it starts, before its shell runs a line).
    background(server, sandbox_id, "trap '' TERM; touch /tmp/trapped; sleep 600")
    deadline = time.monotonic() + 30
    while server.json(
        "POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": "test -e /tmp/trapped"}
    ).json()["exit_code"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def info(server: Server, sandbox_id: str) -> dict[str, Any]:
    found: dict[str, Any] = server.raw("GET", f"/v1/sandboxes/{sandbox_id}").json()
    return found


def wait_ended(server: Server, sandbox_id: str, within_s: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while (now := info(server, sandbox_id))["state"] in ("running", "created"):
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    return now


def test_a_delete_without_grace_kills(server: Server, backend: str) -> None:
    sandbox_id = create(server, backend)
    assert info(server, sandbox_id)["ending"] is None
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status == 204
    ended = info(server, sandbox_id)
    assert (ended["state"], ended["ending"], ended["detail"]) == ("stopped", "killed", "deleted")


def test_processes_that_exit_on_sigterm_make_a_clean_stop(server: Server, backend: str) -> None:
    sandbox_id = create(server, backend)
    background(server, sandbox_id, "sleep 600")
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}?grace_s=10").status == 204
    ended = info(server, sandbox_id)
    assert (ended["state"], ended["ending"], ended["detail"]) == ("stopped", "stopped", "deleted")


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(
    server: Server, backend: str
) -> None:
    sandbox_id = create(server, backend)
    ignore_sigterm(server, sandbox_id)
    background(server, sandbox_id, "sleep 600")
    started = time.monotonic()
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}?grace_s=1").status == 204
    assert time.monotonic() - started >= 1
    ended = info(server, sandbox_id)
    assert ended["ending"] == "killed_after_grace"
    assert ended["detail"] == (
        "deleted; 1 process(es) still running after the 1 s grace period were killed"
    )


def test_a_stop_that_does_not_say_takes_the_sandboxes_own_grace(
    server: Server, backend: str
) -> None:
    sandbox_id = create(server, backend, stop_grace_s=1)
    assert info(server, sandbox_id)["stop_grace_s"] == 1
    ignore_sigterm(server, sandbox_id)
    started = time.monotonic()
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status == 204
    assert time.monotonic() - started >= 1
    assert info(server, sandbox_id)["ending"] == "killed_after_grace"
    # One that says wins: none at all.
    sandbox_id = create(server, backend, stop_grace_s=60)
    ignore_sigterm(server, sandbox_id)
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}?grace_s=0").status == 204
    assert info(server, sandbox_id)["ending"] == "killed"


def test_a_timeout_is_recorded_as_one(server: Server, backend: str) -> None:
    sandbox_id = create(server, backend, timeout_s=1)
    ended = wait_ended(server, sandbox_id)
    assert (ended["state"], ended["ending"], ended["detail"]) == (
        "stopped",
        "timed_out",
        "timed out",
    )


def test_a_sandbox_that_dies_by_itself_is_failed_and_says_so(server: Server, backend: str) -> None:
    sandbox_id = create(server, backend)
    # What a crash of the sandbox looks like from the host: its processes are gone.
    killed = [pid for pid, _ in processes_mentioning(sandbox_id)]
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    ended = wait_ended(server, sandbox_id)
    assert (ended["state"], ended["ending"]) == ("failed", "exited"), ended
    assert ended["detail"]
    # The server saw it end: it is no longer listed as running, and deleting it is a no-op.
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status == 204
    assert info(server, sandbox_id)["ending"] == "exited"
