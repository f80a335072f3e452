"""A real `tartarus serve` process for tests: its own runtime and state dirs under
tmp_path, a unix socket and a loopback TCP port picked by the kernel.

`raw` requests use the standard library's http.client, so tests see exactly what
went over the wire (status, headers, bytes), without the SDK in between.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tartarus.config import load_settings
from tartarus.host.doctor import run_doctor
from tests.support import template_seed

START_TIMEOUT_S = 60.0


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    socket_path: Path
    tcp_url: str | None
    env: dict[str, str]
    state_dir: Path
    runtime_dir: Path
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"unix:{self.socket_path}"

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        tcp: bool = False,
        timeout: float = 120.0,
    ) -> Reply:
        conn: http.client.HTTPConnection
        if tcp:
            assert self.tcp_url is not None
            host, port = self.tcp_url.removeprefix("http://").rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        else:
            conn = UnixHTTPConnection(str(self.socket_path), timeout=timeout)
        try:
            data = body.encode() if isinstance(body, str) else body
            conn.request(method, path, body=data, headers=dict(headers or {}))
            response = conn.getresponse()
            return Reply(
                status=response.status,
                headers={k.lower(): v for k, v in response.getheaders()},
                body=response.read(),
            )
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: Any = None, **kw: Any) -> Reply:
        body = None if payload is None else json.dumps(payload)
        return self.raw(method, path, body, {"Content-Type": "application/json"}, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def teardowns_done(self, timeout: float = 60.0) -> None:
        """Waits until no deleted sandbox's teardown runs in the background (a DELETE
        answers once the sandbox's code stopped): what a leak check must wait for."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.raw("GET", "/metrics").body.decode()
            found = re.search(r"^tartarus_sandbox_teardowns_in_flight (\S+)$", metrics, re.M)
            assert found is not None, "no tartarus_sandbox_teardowns_in_flight in /metrics"
            if float(found.group(1)) == 0:
                return
            assert time.monotonic() < deadline, f"teardowns still running after {timeout} s"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


@contextmanager
def short_dir() -> Iterator[Path]:
    """A private directory with a short path: backends put unix sockets a few levels
    below the runtime dir, and a socket path may be at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def server_env(
    base: Path, *, seed_templates: tuple[str, ...] = ("base", "python"), **extra: str
) -> dict[str, str]:
    """The environment of a server (or CLI) whose state is under `base`; its template
    store starts with the seed's builds of `seed_templates` (tests.support.template_seed)."""
    # The caller's server and settings stay out; binary overrides (`TARTARUS_*_BIN`) stay.
    ours = {"TARTARUS_URL", "TARTARUS_API_KEY", "TARTARUS_CONFIG"}
    env = {
        k: v
        for k, v in os.environ.items()
        if (k not in ours and not k.endswith("_DIR")) or not k.startswith("TARTARUS_")
    }
    env.update(
        TARTARUS_RUNTIME_DIR=str(base / "run"),
        TARTARUS_STATE_DIR=str(base / "state"),
        TARTARUS_CACHE_DIR=str(Path.home() / ".cache" / "tartarus"),
        **extra,
    )
    if seed_templates:
        template_seed.clone_into(Path(env["TARTARUS_STATE_DIR"]), seed_templates)
    return env


def start_server(
    base: Path,
    *args: str,
    env: dict[str, str] | None = None,
    command: str = "serve",
    listen: tuple[str, str] = ("--tcp", "127.0.0.1:0"),
    prefix: tuple[str, ...] = (),
) -> Server:
    """Starts `tartarus serve --json --tcp 127.0.0.1:0` (or another `command` that
    announces its endpoints, run under `prefix` such as `ip netns exec NS`) and waits for
    its announcement."""
    env = env or server_env(base)
    base.mkdir(parents=True, exist_ok=True)
    log_path = base / "server.log"
    announce = base / "announce.json"
    with log_path.open("ab") as log, announce.open("wb") as out:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tartarus", command, "--json", *listen, *args],
            stdout=out,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}: {log_path.read_text()}")
        text = announce.read_text()
        if text.strip().endswith("}"):
            endpoints = json.loads(text)["endpoints"]
            sock = next(e for e in endpoints if e.startswith("unix:"))
            tcp = next((e for e in endpoints if e.startswith("http")), None)
            return Server(
                process=process,
                socket_path=Path(sock.removeprefix("unix:")),
                tcp_url=tcp,
                env=env,
                state_dir=Path(env["TARTARUS_STATE_DIR"]),
                runtime_dir=Path(env["TARTARUS_RUNTIME_DIR"]),
                log_path=log_path,
            )
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s: {log_path.read_text()}")


@contextmanager
def running_server(base: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = start_server(base, *args, env=env)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def cli(
    server: Server,
    *args: str,
    input: bytes | None = None,
    timeout: float = 120.0,
    api_key: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Runs the `tartarus` CLI against `server`: over its unix socket, or with `api_key`
    over its TCP endpoint, as a remote user would."""
    env = dict(server.env, TARTARUS_URL=server.url)
    if api_key is not None:
        env.update(TARTARUS_URL=server.tcp_url or "", TARTARUS_API_KEY=api_key)
    return subprocess.run(
        [sys.executable, "-m", "tartarus", *args],
        env=env,
        input=input if input is not None else b"",
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def require_backend() -> str:
    """The sandbox backend e2e tests use: `$TARTARUS_TEST_BACKEND`, else the first of
    jail and gvisor that the doctor says runs here; skips with the reason otherwise.
    The backends ship in the wheel: a wheel without them fails here (ImportError)
    rather than skipping."""
    importlib.import_module("tartarus.runtime.selector")
    wanted = os.environ.get("TARTARUS_TEST_BACKEND")
    report = run_doctor(load_settings())
    candidates = [wanted] if wanted else ["jail", "gvisor"]
    reasons = []
    for name in candidates:
        verdict = report.backend(name)
        if verdict.available:
            return name
        reasons.append(f"{name}: {verdict.reason}")
    pytest.skip("no usable sandbox backend: " + "; ".join(reasons))


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains `text` (e.g. a test's private dir):
    what a leaked sandbox would look like."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def end_what_outlived(base: Path) -> None:
    """After a test that killed its server (its sandboxes outlive it): a server started
    on `base` takes back what is left and its graceful stop stops it, so a test that
    failed before its own restart leaks nothing. What still runs then (a server's
    state elsewhere under `base`) is killed."""
    if not processes_mentioning(str(base)):
        return
    with contextlib.suppress(RuntimeError), running_server(base):
        pass
    for pid, _ in processes_mentioning(str(base)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def sandbox_base() -> Iterator[Path]:
    """A short private directory for servers whose sandboxes may outlive them (tests
    that kill a server): whatever is left there is ended on the way out."""
    with short_dir() as path:
        try:
            yield path
        finally:
            end_what_outlived(path)
