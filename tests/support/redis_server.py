"""A real redis-server for tests: its own directory under tmp_path, a free loopback port,
no persistence, stopped (and waited for) when the test ends."""

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

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


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


@contextmanager
def redis_server(directory: Path, host: str = "127.0.0.1") -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not on PATH (make test installs it with apt-get)")
    directory.mkdir(parents=True, exist_ok=True)
    for _attempt in range(5):
        # The kernel picked a free port a moment ago; another process may take it first,
        # in which case redis-server exits and we try another.
        port = _free_port(host)
        log = directory / f"redis-{port}.log"
        process = subprocess.Popen(
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
                "--appendonly",
                "no",
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(host, port):
                try:
                    yield RedisServer(process=process, port=port, host=host)
                finally:
                    process.terminate()
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()
                return
            time.sleep(0.02)
        process.kill()
        process.wait()
    raise RuntimeError(f"redis-server did not start; see the logs in {directory}")
