"""The local server: with no `TARTARUS_URL`, the SDK and CLI use (or start) the
`tartarus serve` of this user, on the unix socket in the runtime dir.

Starting is serialised by a lock file, so two clients starting at once share one
server. The server runs detached (its own session) and outlives the client; its log
goes to `STATE_DIR/server.log`.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from tartarus.endpoint import Endpoint, default_socket_path
from tartarus.paths import ensure_private_dir
from tartarus.sdk.errors import ServerUnreachableError
from tartarus.sdk.wire import WireError
from tartarus.sdk.wire import request as wire_request

if TYPE_CHECKING:
    from tartarus.config import Settings

START_TIMEOUT_S = 60.0
POLL_S = 0.05


async def server_answers(socket_path: Path) -> bool:
    try:
        with anyio.fail_after(5):
            response = await wire_request(
                Endpoint.unix(socket_path),
                "GET",
                "/v1/health",
                headers={},
                body=None,
                connect_timeout_s=5,
                line_limit=1 << 16,
            )
            async with response:
                await response.read()
                return response.status == 200
    except (WireError, OSError, TimeoutError):
        return False


def server_log_path(settings: Settings) -> Path:
    return settings.state_dir / "server.log"


def _lock_blocking(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def ensure_local_server(settings: Settings) -> Endpoint:
    """The local server's endpoint; starts the server if nothing answers there."""
    socket_path = default_socket_path(settings)
    if await server_answers(socket_path):
        return Endpoint.unix(socket_path)
    runtime_dir = ensure_private_dir(settings.runtime_dir)
    fd = await anyio.to_thread.run_sync(_lock_blocking, runtime_dir / "autostart.lock")
    try:
        if not await server_answers(socket_path):
            await _start(settings, socket_path)
    finally:
        os.close(fd)
    return Endpoint.unix(socket_path)


async def _start(settings: Settings, socket_path: Path) -> None:
    ensure_private_dir(settings.state_dir)
    log_path = server_log_path(settings)
    env = dict(os.environ)
    env.pop("TARTARUS_URL", None)
    with log_path.open("ab") as log:
        # `--detach` forks again and returns at once: the server is not our child, so
        # it outlives us and is never our zombie.
        launcher = await anyio.run_process(
            [sys.executable, "-m", "tartarus", "serve", "--detach", "--socket", str(socket_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            check=False,
        )
    if launcher.returncode == 0:
        for _ in range(int(START_TIMEOUT_S / POLL_S)):
            if await server_answers(socket_path):
                return
            await anyio.sleep(POLL_S)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise ServerUnreachableError(
        f"could not start the local tartarus server; its log ({log_path}) ends with:\n{tail}"
    )
