"""A STAND-IN runtime for fleet tests: each "sandbox" is a plain host process group in a
scratch directory, with no isolation at all.

The fleet tests exercise scheduling, queues, node loss and enforcement across real
processes; they use the jail backend when this build has one that works here
(`fleet_provider` below decides and says which), and this stand-in otherwise, so the
fleet's own behaviour is tested either way (the jail on request:
TARTARUS_FLEET_TEST_BACKEND=jail). It implements what the fleet touches:
lifecycle, exec (collected output), stats (CPU time and resident memory of the group)
and reaping; the rest raises NotSupportedError.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import signal
import signal as signal_module
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from tartarus.agent.provider import HostRuntimes
from tartarus.config import Settings
from tartarus.images.store import TemplateManifest
from tartarus.runtime.base import NotSupportedError, Runtime
from tartarus.runtime.types import (
    Backend,
    ExecEvent,
    ExecRequest,
    ExecResult,
    ExitStatus,
    FileInfo,
    LogEntry,
    OutputChunk,
    ProcessInfo,
    Resources,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


MARK = "TARTARUS_STAND_IN_SANDBOX"


_SCAN: tuple[float, dict[str, list[int]]] = (0.0, {})
SCAN_EVERY_S = 0.5


def _members(sandbox_id: str, *, fresh: bool = False) -> list[int]:
    """Pids of the sandbox's processes: each carries the sandbox's mark in its environment.
    One scan of /proc serves every sandbox for a moment (it reads every process)."""
    global _SCAN  # noqa: PLW0603 - a cache shared by the sandboxes of this process
    at, members = _SCAN
    if fresh or time.monotonic() - at > SCAN_EVERY_S:
        members = {}
        prefix = f"{MARK}=".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            start = environ.find(prefix)
            if start >= 0:
                end = environ.find(b"\0", start)
                owner = environ[start + len(prefix) : end if end >= 0 else None].decode()
                members.setdefault(owner, []).append(int(entry.name))
        _SCAN = (time.monotonic(), members)
    return members.get(sandbox_id, [])


def _usage(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of these processes."""
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / TICKS
        rss += int(fields[21]) * PAGE
    return cpu, rss


def _kill_all(sandbox_id: str) -> None:
    for pid in _members(sandbox_id, fresh=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Execution:
    def __init__(self, process: Process) -> None:
        self._process = process
        self._started = time.monotonic()

    @property
    def pid(self) -> int:
        return self._process.pid

    async def events(self) -> AsyncIterator[ExecEvent]:
        result = await self.wait()
        seq = 0
        for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            if data:
                seq += 1
                yield OutputChunk(pid=self.pid, stream=stream, seq=seq, data=data)  # type: ignore[arg-type]
        yield result.exit

    async def write_stdin(self, data: bytes) -> None:
        raise NotSupportedError(Backend.JAIL, "stdin (stand-in runtime)")

    async def close_stdin(self) -> None:
        if self._process.stdin is not None:
            await self._process.stdin.aclose()

    async def resize(self, rows: int, cols: int) -> None:
        raise NotSupportedError(Backend.JAIL, "pty (stand-in runtime)")

    async def kill(self, signal: int = 9) -> None:
        self._process.send_signal(signal_module.Signals(signal))

    async def wait(self) -> ExecResult:
        out, err = bytearray(), bytearray()

        async def drain(stream: Any, buf: bytearray) -> None:
            if stream is not None:
                async for chunk in stream:
                    buf.extend(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, self._process.stdout, out)
            tg.start_soon(drain, self._process.stderr, err)
        code = await self._process.wait()
        status = ExitStatus(
            pid=self.pid,
            code=code if code >= 0 else None,
            signal=-code if code < 0 else None,
            duration_s=time.monotonic() - self._started,
        )
        return ExecResult(stdout=bytes(out), stderr=bytes(err), exit=status)


class ProcessSandbox:
    def __init__(self, spec: SandboxSpec, root: Path) -> None:
        self.spec = spec
        self.root = root
        self._init: Process | None = None
        self._processes: list[Process] = []
        self._state = SandboxState.CREATED

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def backend(self) -> Backend:
        return Backend.JAIL

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._init = await anyio.open_process(
            ["sleep", "infinity"], cwd=self.root, env=self._env(), start_new_session=True
        )
        self._state = SandboxState.RUNNING

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, **self.spec.env, **(extra or {}), MARK: self.id}

    async def status(self) -> SandboxStatus:
        return SandboxStatus(id=self.id, backend=self.backend, state=self._state)

    async def exec(self, request: ExecRequest) -> _Execution:
        assert self._init is not None
        argv = request.argv or ["/bin/sh", "-c", request.shell or "true"]
        process = await anyio.open_process(argv, cwd=self.root, env=self._env(request.env))
        self._processes.append(process)
        return _Execution(process)

    async def processes(self) -> list[ProcessInfo]:
        return []

    async def attach(self, pid: int) -> _Execution:
        raise NotSupportedError(self.backend, "attach (stand-in runtime)")

    async def kill_process(self, pid: int, signal: int = 9) -> None:
        os.kill(pid, signal)

    async def logs(self, *, follow: bool = False, since_seq: int = 0) -> AsyncIterator[LogEntry]:
        raise NotSupportedError(self.backend, "logs (stand-in runtime)")
        yield  # pragma: no cover

    async def read_file(self, path: str) -> bytes:
        return (self.root / path.lstrip("/")).read_bytes()

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        (self.root / path.lstrip("/")).write_bytes(data)

    async def download(self, path: str) -> AsyncIterator[bytes]:
        yield await self.read_file(path)

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        data = b"".join([c async for c in chunks])
        await self.write_file(path, data)
        return len(data)

    async def list_dir(self, path: str) -> list[FileInfo]:
        raise NotSupportedError(self.backend, "list_dir (stand-in runtime)")

    async def stat(self, path: str) -> FileInfo:
        raise NotSupportedError(self.backend, "stat (stand-in runtime)")

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        raise NotSupportedError(self.backend, "make_dir (stand-in runtime)")

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        raise NotSupportedError(self.backend, "remove (stand-in runtime)")

    async def rename(self, src: str, dst: str) -> None:
        raise NotSupportedError(self.backend, "rename (stand-in runtime)")

    async def stats(self) -> SandboxStats:
        pids = _members(self.id)
        cpu, rss = _usage(pids)
        return SandboxStats(
            cpu_seconds=cpu,
            memory_bytes=rss,
            memory_limit_bytes=self.spec.resources.memory_mib << 20,
            pids=len(pids),
        )

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(self.backend, "snapshot (stand-in runtime)")

    async def stop(self, grace_s: float = 10.0) -> None:
        await self.kill()

    async def kill(self) -> None:
        _kill_all(self.id)
        for process in [*self._processes, *([self._init] if self._init else [])]:
            await process.aclose()
        self._processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        self._state = SandboxState.STOPPED


class ProcessRuntime:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def backend(self) -> Backend:
        return Backend.JAIL

    async def create(self, spec: SandboxSpec) -> ProcessSandbox:
        return ProcessSandbox(spec, self.root / spec.id)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> ProcessSandbox:
        raise NotSupportedError(self.backend, "restore (stand-in runtime)")

    async def reap(self, keep: set[str]) -> list[str]:
        reaped: list[str] = []
        if not self.root.is_dir():
            return reaped
        for entry in self.root.iterdir():
            if entry.name in keep:
                continue
            _kill_all(entry.name)
            shutil.rmtree(entry, ignore_errors=True)
            reaped.append(entry.name)
        return reaped


class StandInProvider(HostRuntimes):
    """This host's runtimes with the stand-in in place of every backend and a made-up
    template (no root filesystem: the stand-in runs host processes)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.stand_in = ProcessRuntime(settings.state_dir / "stand-in-sandboxes")

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        return self.stand_in, "stand-in process runtime (fleet tests)"

    async def prepare(
        self, spec: SandboxSpec, backend: Backend
    ) -> tuple[SandboxSpec, TemplateManifest]:
        return spec, TemplateManifest(
            id=spec.template,
            description="stand-in",
            source="stand-in",
            key="",
            rootfs="",
            ext4=None,
            layers=[],
            base="",
            agent="",
            env={},
            workdir="/",
            user=None,
            entrypoint=[],
            cmd=[],
            resources=Resources(),
            max_resources=None,
            timeout_s=300.0,
            backends=[Backend.JAIL],
            warmup=None,
            size_bytes=0,
            files=0,
            built_at=0.0,
            build_seconds=0.0,
        )

    async def release(self, sandbox_id: str) -> None:
        pass

    async def reap_all(self) -> set[str]:
        return set(await self.stand_in.reap(keep=set()))

    async def describe(self) -> dict[str, str]:
        return {"jail": "available: stand-in process runtime for fleet tests"}


def stand_in(settings: Settings) -> StandInProvider:
    return StandInProvider(settings)


def real_jail_available() -> str | None:
    """Why the fleet tests do not run on the real jail here (None: they do).

    Opt-in with TARTARUS_FLEET_TEST_BACKEND=jail while the jail backend is new, so a
    change in the backend shows up in its own tests before it moves the fleet's."""
    if os.environ.get("TARTARUS_FLEET_TEST_BACKEND") != "jail":
        return "TARTARUS_FLEET_TEST_BACKEND=jail not set"
    try:
        importlib.import_module("tartarus.runtime.selector")
    except ModuleNotFoundError:
        return "this build has no tartarus.runtime.selector (the jail backend has not landed)"
    return None


def reap_leftovers(agent_base: Path) -> list[str]:
    """Kills stand-in sandboxes an agent (whose dirs are under `agent_base`) left behind."""
    runtime = ProcessRuntime(agent_base / "state" / "stand-in-sandboxes")
    return anyio.run(runtime.reap, set())
