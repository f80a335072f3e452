"""The `Runtime` protocol: one interface over the microVM, gVisor, jail and wasm backends.

A `Runtime` is a backend on this host; it creates `Sandbox` instances. A `Sandbox` is
one running isolation unit; every operation the server and SDK need goes through it.
Backends that cannot do something (wasm has no shell, jail cannot snapshot) raise
`NotSupportedError` naming the backend and the operation.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from tartarus.errors import TartarusError
from tartarus.runtime.types import (
    Backend,
    ExecEvent,
    ExecRequest,
    ExecResult,
    FileInfo,
    FsChange,
    LogEntry,
    ProcessInfo,
    SandboxSpec,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
)


class SandboxError(TartarusError):
    """A backend failed to do what was asked; the message says what and why."""


class NotSupportedError(SandboxError):
    def __init__(self, backend: Backend, operation: str) -> None:
        super().__init__(f"the {backend.value} backend does not support {operation}")


# The backends that give a sandbox granted network a namespace of its own, with the
# egress rules (tartarus.network). microvm guests have no network device yet and wasm
# modules no sockets: a grant there is refused, never silently dropped.
NETWORKED = frozenset({Backend.JAIL, Backend.GVISOR})


def refuse_network(spec: SandboxSpec, backend: Backend) -> None:
    """Raises `NotSupportedError` when `spec` asks for a network `backend` cannot give."""
    if spec.network and backend not in NETWORKED:
        raise NotSupportedError(
            backend, "network (use the gvisor or jail backend for a sandbox with a network)"
        )


class NoNetworkError(SandboxError):
    """The sandbox has no link to the host, so nothing on the host reaches its ports."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(
            f"sandbox {sandbox_id} has no network link, so its ports cannot be reached: "
            "create it with a network (`network: true`, `--network`)"
        )


class BackendUnavailableError(SandboxError):
    """The requested backend cannot run on this host; the message names what is missing."""


class SandboxNotFoundError(SandboxError):
    pass


class ExecTimeoutError(SandboxError):
    pass


@runtime_checkable
class Execution(Protocol):
    """A running command. Events arrive in order; the last one is an `ExitStatus`."""

    @property
    def pid(self) -> int: ...

    def events(self) -> AsyncIterator[ExecEvent]: ...

    async def write_stdin(self, data: bytes) -> None: ...

    async def close_stdin(self) -> None: ...

    async def resize(self, rows: int, cols: int) -> None: ...

    async def kill(self, signal: int = 9) -> None: ...

    async def wait(self) -> ExecResult:
        """Collects the remaining output and the exit status."""
        ...


class DirWatch(Protocol):
    def changes(self) -> AsyncIterator[FsChange]:
        """Changes as they happen; ends when the watched directory goes."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Sandbox(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def lost(self) -> bool:
        """True once the sandbox is known to have ended by itself (its agent's
        connection closed while nothing was stopping it); cheap, for a watcher."""
        ...

    async def start(self) -> None: ...

    async def status(self) -> SandboxStatus: ...

    async def exec(self, request: ExecRequest) -> Execution: ...

    async def processes(self) -> list[ProcessInfo]: ...

    async def attach(self, pid: int) -> Execution:
        """Reattaches to a background process: replays its buffered output, then follows."""
        ...

    async def kill_process(self, pid: int, signal: int = 9) -> None: ...

    def logs(self, *, follow: bool = False, since_seq: int = 0) -> AsyncIterator[LogEntry]: ...

    async def read_file(self, path: str) -> bytes: ...

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Atomic: readers see the old content or the new, never a mix."""
        ...

    def download(self, path: str) -> AsyncIterator[bytes]: ...

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        """Streams a large file in; returns the bytes written. Atomic like write_file."""
        ...

    async def list_dir(self, path: str) -> list[FileInfo]: ...

    async def stat(self, path: str) -> FileInfo: ...

    async def make_dir(self, path: str, *, parents: bool = True) -> None: ...

    async def remove(self, path: str, *, recursive: bool = False) -> None: ...

    async def rename(self, src: str, dst: str) -> None: ...

    async def watch_dir(self, path: str, *, recursive: bool = False) -> DirWatch:
        """Watches a directory: returns once the watch is in place (so a missing path
        fails here), then `DirWatch.changes` yields what changes until `close`."""
        ...

    async def stats(self) -> SandboxStats: ...

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo: ...

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        """Writes a snapshot to `dest_dir` and ends the sandbox, freeing its memory and
        processes (a pause); `Runtime.restore` brings it back."""
        ...

    async def freeze(self) -> None:
        """Stops every process where it is, memory kept (a pause without a snapshot)."""
        ...

    async def thaw(self) -> None: ...

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        """SIGTERM every process, wait up to `grace_s`, then kill; releases all resources.
        Returns how the processes ended; None where the backend cannot tell."""
        ...

    async def kill(self) -> None:
        """Immediate teardown; releases all resources. Idempotent."""
        ...

    async def halt(self) -> None:
        """Kills every process at once: no code of the sandbox runs once it returns.
        What is left (mounts, cgroups, links, files) goes with the `kill` that must
        follow, which may run off the caller's path (a DELETE answers after the halt)."""
        ...

    async def detach(self) -> bool:
        """Lets go of the sandbox without stopping it, for the next server on this
        state directory to re-attach to; False (and nothing done) if it cannot outlive
        its server."""
        ...

    async def port_address(self, port: int) -> tuple[str, int]:
        """Where this host connects to reach `port` inside the sandbox (`NoNetworkError`
        without a link; `NotSupportedError` on backends without sockets)."""
        ...


@runtime_checkable
class Runtime(Protocol):
    """One backend on this host."""

    @property
    def backend(self) -> Backend: ...

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Prepares (but does not start) a sandbox."""
        ...

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> Sandbox:
        """Creates a running sandbox from a snapshot taken by this backend."""
        ...

    async def reattach(self, spec: SandboxSpec) -> Sandbox | None:
        """The running sandbox `spec.id`, left by a server that died, connected again;
        None if this backend's sandboxes do not outlive their server or it is gone."""
        ...

    async def reap(self, keep: set[str]) -> list[str]:
        """Kills and cleans up leftovers of this backend not in `keep` (after a server
        crash); returns the ids it removed."""
        ...
