"""Without TARTARUS_URL the SDK and CLI start the user's local server, once, and reuse it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import pid_alive, server_env

pytestmark = pytest.mark.timeout(180)


def _server_pid(runtime_dir: Path) -> int:
    return int((runtime_dir / "server.lock").read_text().split()[0])


@pytest.fixture
def local_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = server_env(tmp_path)
    yield env
    lock = Path(env["TARTARUS_RUNTIME_DIR"]) / "server.lock"
    if lock.exists() and lock.read_text().strip():
        pid = _server_pid(lock.parent)
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not pid_alive(pid), "the local server did not stop on SIGTERM"


def test_sdk_starts_the_local_server_and_reuses_it(local_env: dict[str, str]) -> None:
    script = "import anyio\nfrom tartarus import Sandbox\nprint(len(anyio.run(Sandbox.list)))\n"
    first = subprocess.run(
        [sys.executable, "-c", script],
        env=local_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "0"
    runtime_dir = Path(local_env["TARTARUS_RUNTIME_DIR"])
    pid = _server_pid(runtime_dir)
    assert pid_alive(pid)
    assert (runtime_dir / "tartarus.sock").stat().st_mode & 0o777 == 0o600
    # The server outlives the client and the next client reuses it.
    second = subprocess.run(
        [sys.executable, "-c", script],
        env=local_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0, second.stderr
    assert _server_pid(runtime_dir) == pid


def test_concurrent_clients_start_one_server(local_env: dict[str, str]) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tartarus", "ps", "--json"],
            env=local_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert out.strip() == b"[]"
    log = (Path(local_env["TARTARUS_STATE_DIR"]) / "server.log").read_text()
    assert log.count("listening on") == 1, log
