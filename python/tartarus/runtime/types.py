"""Types shared by every backend, the server and the SDK: what a sandbox is asked to
be, what an exec asks for, and what comes back. All msgspec Structs, so they cross
process and network boundaries unchanged.

The types a client also names (backend, trust, state, resources, streams, file
entries) live in the leaf `tartarus.api.sandbox`, so the SDK need not load the
runtime; they are re-exported here for the backends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import msgspec

from tartarus.api.sandbox import (
    Backend,
    FileInfo,
    FileKind,
    Resources,
    SandboxState,
    Stream,
    TrustLevel,
)

# Every backend's sandbox answers `hostname` with this (the jail's default is the same,
# rust/jail/src/config.rs); template builds write it to /etc/hostname and /etc/hosts.
SANDBOX_HOSTNAME: Final = "tartarus"

# With the names that live in `tartarus.api.sandbox` (a leaf the SDK loads), re-exported here.
__all__ = [
    "SANDBOX_HOSTNAME",
    "Backend",
    "ExecEvent",
    "ExecRequest",
    "ExecResult",
    "ExitStatus",
    "FileInfo",
    "FileKind",
    "LogEntry",
    "OutputChunk",
    "ProcessInfo",
    "PtySize",
    "Resources",
    "SandboxSpec",
    "SandboxState",
    "SandboxStats",
    "SandboxStatus",
    "SnapshotInfo",
    "Stream",
    "TrustLevel",
]


class SandboxSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a backend needs to create one sandbox."""

    id: str
    template: str = "base"
    # The template's root filesystem, resolved by the image store (Erebus).
    rootfs: Path | None = None
    backend: Backend = Backend.AUTO
    resources: Resources = msgspec.field(default_factory=Resources)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    network: bool = False
    # With a network: what it may reach (the policy's `network.egress` entries,
    # `tartarus.network.egress`); empty: any public destination.
    egress: list[str] = msgspec.field(default_factory=list)
    trust: TrustLevel = TrustLevel.UNTRUSTED
    # For the wasm backend: the module to run (a `.wasm` module selects wasm under auto).
    wasm_module: Path | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)


class PtySize(msgspec.Struct, frozen=True):
    rows: int = 24
    cols: int = 80


class ExecRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One command to run in a sandbox: `argv`, or `shell` (run by `/bin/sh -c`)."""

    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    stdin: bool = False
    pty: PtySize | None = None
    timeout_s: float | None = None
    background: bool = False
    # Output kept for this process inside the sandbox (default 16 MiB); a reader that
    # falls further behind loses the oldest chunks, counted in ExitStatus.dropped_chunks.
    buffer_bytes: int | None = None


class OutputChunk(msgspec.Struct, frozen=True, tag="output"):
    """A piece of output. `seq` increases by one per chunk of one process, so a gap
    means chunks were dropped by the bounded buffer (see ExitStatus.dropped_chunks)."""

    pid: int
    stream: Stream
    seq: int
    data: bytes


class ExitStatus(msgspec.Struct, frozen=True, tag="exit", kw_only=True):
    pid: int
    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    dropped_chunks: int = 0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code == 0


ExecEvent = OutputChunk | ExitStatus


class ExecResult(msgspec.Struct, frozen=True):
    stdout: bytes
    stderr: bytes
    exit: ExitStatus


class ProcessInfo(msgspec.Struct, frozen=True, kw_only=True):
    pid: int
    argv: list[str]
    started_at: float
    running: bool
    pty: bool = False
    exit: ExitStatus | None = None


class LogEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line-or-chunk of a sandbox's log (all processes, in order)."""

    seq: int
    ts: float
    pid: int
    stream: Stream
    data: bytes


class FsChange(msgspec.Struct, frozen=True, kw_only=True):
    """A change under a watched directory (inotify in the sandbox's agent): `kind` is
    create, write, remove, rename, chmod, or overflow (events were lost)."""

    path: str
    kind: str


class SandboxStats(msgspec.Struct, frozen=True, kw_only=True):
    cpu_seconds: float
    memory_bytes: int
    memory_limit_bytes: int | None = None
    pids: int = 0
    # Processes the kernel killed at the memory limit since the sandbox started (backends
    # with a host cgroup; 0 elsewhere).
    oom_kills: int = 0


class StopOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a graceful stop ended a sandbox's processes."""

    # Exited after their SIGTERM within the grace period.
    terminated: int = 0
    # Still running when it ran out: killed.
    killed: int = 0
    # The stop itself failed (or overran), and the sandbox was killed whole.
    forced: bool = False


class SandboxStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    backend: Backend
    state: SandboxState
    detail: str = ""
    # Failed because the host's OOM killer ended it.
    oom: bool = False


class SnapshotInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A backend snapshot on local disk; the snapshot store (Nyx) files it in the blob store.

    `path` is a file or a directory, as the backend writes it. `base` is set for an
    incremental snapshot: the snapshot `path` applies on top of (needed to restore it).
    """

    backend: Backend
    path: Path
    size_bytes: int
    source_sandbox: str
    base: Path | None = None
