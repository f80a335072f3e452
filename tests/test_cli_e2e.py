"""The CLI against a real server and backend: run, exec (piped and on a terminal), ps,
inspect, logs, cp, kill, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server, cli, processes_mentioning, require_backend, running_server

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def backend() -> str:
    return require_backend()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("cli-e2e")
    with running_server(base) as s:
        yield s
    assert processes_mentioning(str(base)) == []


def started(server: Server, backend: str) -> str:
    out = cli(server, "run", "-b", backend, "--keep", "--json", "--", "true")
    assert out.returncode == 0, out.stderr
    sandbox_id: str = json.loads(out.stdout)["sandbox"]["id"]
    return sandbox_id


def test_run_passes_the_exit_code_through(server: Server, backend: str) -> None:
    out = cli(server, "run", "-b", backend, "--", "echo hello; echo oops >&2; exit 7")
    assert out.returncode == 7
    assert out.stdout == b"hello\n"
    assert out.stderr.endswith(b"oops\n")
    out = cli(server, "run", "-b", backend, "--", "sh", "-c", "kill -TERM $$")
    assert out.returncode == 128 + 15
    # The sandbox is gone afterwards.
    assert json.loads(cli(server, "ps", "--json").stdout) == []


def test_run_json_and_explain(server: Server, backend: str) -> None:
    out = cli(server, "run", "-b", backend, "--json", "--explain", "-e", "X=1", "--", "echo $X")
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["stdout"] == "1\n"
    assert doc["exit"]["code"] == 0
    assert doc["sandbox"]["backend"] == backend
    assert b"backend:" in out.stderr


def test_run_interactive_with_piped_stdin(server: Server, backend: str) -> None:
    out = cli(server, "run", "-b", backend, "-i", "--", "tr a-z A-Z", input=b"shout\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"SHOUT\n"


def test_exec_ps_inspect_logs_cp_kill(server: Server, backend: str, tmp_path: Path) -> None:
    sb = started(server, backend)
    out = cli(server, "exec", sb, "--", "sh", "-c", "echo in-exec; exit 3")
    assert out.returncode == 3
    assert out.stdout == b"in-exec\n"
    out = cli(server, "exec", "-i", sb, "--", "wc -c", input=b"12345")
    assert out.stdout.strip() == b"5"
    ps = cli(server, "ps")
    assert sb.encode() in ps.stdout
    assert json.loads(cli(server, "inspect", sb).stdout)["state"] == "running"
    logs = cli(server, "logs", sb)
    assert b"in-exec" in logs.stdout
    logs_json = [json.loads(x) for x in cli(server, "logs", "--json", sb).stdout.splitlines()]
    assert any("in-exec" in e["data"] for e in logs_json)
    local = tmp_path / "in.txt"
    local.write_bytes(b"copied\x00bytes")
    assert cli(server, "cp", str(local), f"{sb}:/tmp/in.txt").returncode == 0
    back = tmp_path / "out.txt"
    assert cli(server, "cp", f"{sb}:/tmp/in.txt", str(back)).returncode == 0
    assert back.read_bytes() == b"copied\x00bytes"
    assert cli(server, "cp", f"{sb}:/tmp/in.txt", "-").stdout == b"copied\x00bytes"
    assert cli(server, "cp", f"{sb}:/tmp/nope", "-").returncode == 3
    assert cli(server, "kill", sb).returncode == 0
    assert cli(server, "exec", sb, "--", "true").returncode == 4
    all_json = json.loads(cli(server, "ps", "-a", "--json").stdout)
    assert {"id": sb, "state": "stopped"}.items() <= {
        k: v for i in all_json if i["id"] == sb for k, v in i.items()
    }.items()


def test_logs_follow_ends_when_the_sandbox_stops(server: Server, backend: str) -> None:
    sb = started(server, backend)
    env = dict(server.env, TARTARUS_URL=server.url)
    follower = subprocess.Popen(
        [sys.executable, "-m", "tartarus", "logs", "-f", sb],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        cli(server, "exec", sb, "--", "echo followed")
        cli(server, "kill", sb)
        out, _ = follower.communicate(timeout=60)
        assert b"followed" in out
        assert follower.returncode == 0
    finally:
        if follower.poll() is None:
            follower.kill()


def test_exec_on_a_terminal(server: Server, backend: str) -> None:
    sb = started(server, backend)
    env = dict(server.env, TARTARUS_URL=server.url, TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the pty as its terminal
        os.execve(  # noqa: S606
            sys.executable, [sys.executable, "-m", "tartarus", "exec", sb, "--", "sh"], env
        )
    output = b""
    status = None
    try:
        typed = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the child closed the terminal: it exited
                    break
                if not chunk:
                    break
                output += chunk
            # Type once the remote shell shows its prompt (as a person would).
            if not typed and b"# " in output:
                os.write(fd, b"tty && echo $((6*7)); exit 3\r")
                typed = True
        for _ in range(100):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail(f"tartarus exec did not exit; terminal showed {output!r}")
    finally:
        os.close(fd)
        cli(server, "kill", sb)
    assert status is not None
    assert b"42" in output
    assert b"/dev/pts/" in output
    assert os.waitstatus_to_exitcode(status) == 3
