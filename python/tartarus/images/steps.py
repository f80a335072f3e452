"""Runs build commands: host tools (debootstrap, mkfs) and scripts inside a staging
rootfs. Scripts run under bubblewrap (their own mount, PID, IPC and UTS namespaces,
fresh /proc, /dev and /tmp) so an interrupted build leaves no mounts or processes
behind; their output streams to the progress callback and its tail ends any error."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
from anyio.abc import Process

from tartarus.images.errors import BuildError, ImageError
from tartarus.images.progress import Progress, ProgressCallback

MAX_LINE = 4096
TAIL_LINES = 40
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageError(
            f"{name} is needed for this build but is not on PATH; install the "
            f"Debian package {package!r} (apt-get install {package})"
        )
    return path


def _kill_group(proc: Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_logged(
    argv: Sequence[str],
    *,
    step: str,
    progress: ProgressCallback,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 1800.0,
    stdin: bytes | None = None,
) -> None:
    """Runs `argv` in its own process group, streaming its merged output as progress.
    Raises BuildError with the last lines of output if it fails or times out; kills
    the whole group if cancelled."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    proc = await anyio.open_process(
        list(argv),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    timed_out = False
    try:
        with anyio.move_on_after(timeout_s) as scope:
            if stdin is not None and proc.stdin is not None:
                await proc.stdin.send(stdin)
                await proc.stdin.aclose()
            assert proc.stdout is not None
            buffer = b""
            async for chunk in proc.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_LINE:
                    lines.append(buffer)
                    buffer = b""
                for raw in lines:
                    line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
                    tail.append(line)
                    progress(Progress(step=step, message=line))
            if buffer:
                tail.append(buffer[:MAX_LINE].decode("utf-8", "replace"))
            await proc.wait()
        timed_out = scope.cancelled_caught
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            with anyio.CancelScope(shield=True):
                await proc.wait()
        # Children that outlived the leader (daemons started by a script) go too.
        _kill_group(proc)
        await proc.aclose()
    if timed_out:
        raise BuildError(_failure(step, f"timed out after {timeout_s:.0f} s", tail))
    if proc.returncode != 0:
        raise BuildError(_failure(step, f"exited with status {proc.returncode}", tail))


def _failure(step: str, what: str, tail: collections.deque[str]) -> str:
    output = "\n  ".join(tail) if tail else "(no output)"
    return f"build step {step!r} {what}; last output:\n  {output}"


def bwrap_argv(
    rootfs: Path,
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    network: bool = True,
    read_only: bool = False,
) -> list[str]:
    """A bubblewrap command line that runs `command` with `rootfs` as its root."""
    bwrap = require_tool("bwrap", "bubblewrap")
    argv = [
        bwrap,
        "--bind" if not read_only else "--ro-bind",
        str(rootfs),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "1777",
        "--tmpfs",
        "/tmp",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "tartarus-build",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--chdir",
        "/",
    ]
    if not network:
        argv.append("--unshare-net")
    elif (rootfs / "etc").is_dir() and not (rootfs / "etc").is_symlink():
        argv += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    if os.geteuid() == 0:
        # apt drops to its _apt user and chowns files: root's capabilities are needed.
        argv += ["--cap-add", "ALL"]
    for key, value in {"PATH": DEFAULT_PATH, "HOME": "/root", **env}.items():
        argv += ["--setenv", key, value]
    return [*argv, "--", *command]


async def run_in_rootfs(
    rootfs: Path,
    command: Sequence[str],
    *,
    step: str,
    progress: ProgressCallback,
    env: Mapping[str, str] | None = None,
    network: bool = True,
    read_only: bool = False,
    timeout_s: float = 1800.0,
) -> None:
    argv = bwrap_argv(rootfs, command, env=env or {}, network=network, read_only=read_only)
    await run_logged(argv, step=step, progress=progress, timeout_s=timeout_s)
