"""A real redis-server for tests: its own directory under tmp_path, a free loopback port,
no persistence (or, `durable`, the append-only file synced on every write), stopped (and
waited for) when the test ends."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 10.0


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int
    host: str = "127.0.0.1"
    directory: Path | None = None
    durable: bool = False

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def crash_and_restart(self) -> float:
        """kill -9, then the same server again (same port, same files); returns the
        seconds it did not answer."""
        assert self.directory is not None
        started = time.monotonic()
        self.process.kill()
        self.process.wait()
        self.process = _spawn(self.host, self.port, self.directory, durable=self.durable)
        if not _wait(self.process, self.host, self.port):
            raise RuntimeError(f"redis-server did not come back; see the logs in {self.directory}")
        return time.monotonic() - started


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _spawn(host: str, port: int, directory: Path, *, durable: bool) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH (make test installs it with apt-get)")
    # Durable as docs/fleet.md asks of operators: every write in the append-only file
    # before it is acknowledged, so a crash loses nothing a client was told.
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else [
        "--appendonly", "no"
    ]  # fmt: skip
    return subprocess.Popen(
        [
            binary,
            "--bind",
            host,
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
            *persistence,
            "--logfile",
            str(directory / f"redis-{port}.log"),
        ],
        stdin=subprocess.DEVNULL,
    )


def _wait(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        if _answers(host, port):
            return True
        time.sleep(0.02)
    return False


@contextmanager
def redis_server(
    directory: Path, host: str = "127.0.0.1", *, durable: bool = False
) -> Iterator[RedisServer]:
    """`durable`: appendonly with appendfsync always (what operators must run)."""
    directory.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        # The kernel picked a free port a moment ago; another process may take it first,
        # in which case redis-server exits and we try another.
        port = _free_port(host)
        process = _spawn(host, port, directory, durable=durable)
        if _wait(process, host, port):
            server = RedisServer(
                process=process, port=port, host=host, directory=directory, durable=durable
            )
            try:
                yield server
            finally:
                server.process.terminate()
                try:
                    server.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.process.kill()
                    server.process.wait()
            return
        process.kill()
        process.wait()
    raise RuntimeError(f"redis-server did not start; see the logs in {directory}")
