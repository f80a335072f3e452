"""Reading a sandbox's cgroup from the host: usage, limits, OOM kills (v1 and v2), and
an `Execution` wrapper that reports an OOM kill the agent inside cannot see."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

import msgspec

from tartarus.runtime.base import Execution, SandboxError
from tartarus.runtime.types import ExecEvent, ExecResult, ExitStatus, SandboxStats


class CgroupDir(msgspec.Struct, frozen=True):
    """One directory of a sandbox's cgroup (mirrors `tartarus-jail`'s `started` event)."""

    version: Literal["v1", "v2"]
    path: Path
    controllers: list[str] = msgspec.field(default_factory=list)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _keyed(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        return None
    return None


_CONTROLLERS = ("memory", "pids", "cpu")


def cgroup_hierarchies() -> list[tuple[Literal["v1", "v2"], Path]]:
    """Version and mount point of every cgroup hierarchy."""
    mounts: list[tuple[Literal["v1", "v2"], Path]] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split()[:1]
            if fstype in (["cgroup"], ["cgroup2"]) and len(fields) > 4:
                mounts.append(("v2" if fstype == ["cgroup2"] else "v1", Path(fields[4])))
    return mounts


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 and v2)."""
    return [mount for _, mount in cgroup_hierarchies()]


def cgroup_dirs_named(relative: str) -> list[CgroupDir]:
    """The directories of cgroup `relative` (e.g. `tartarus/x/sb-1`) that exist, in every
    hierarchy."""
    return [
        CgroupDir(version=version, path=mount / relative)
        for version, mount in cgroup_hierarchies()
        if (mount / relative).is_dir()
    ]


def remove_empty_cgroups(relative: str) -> None:
    """Removes `relative` (e.g. `tartarus/vmm`) and its parents, bottom up, from every
    hierarchy where they are empty; a cgroup still in use stays."""
    levels = Path(relative).parts
    for mount in cgroup_mounts():
        for depth in range(len(levels), 0, -1):
            try:
                mount.joinpath(*levels[:depth]).rmdir()
            except OSError:
                break


def cgroup_dirs_of(pid: int) -> list[CgroupDir]:
    """The cgroup directories a process belongs to, in every mounted hierarchy."""
    try:
        membership = Path(f"/proc/{pid}/cgroup").read_text()
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    v2_mount: Path | None = None
    v1_mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, *rest = right.split() or [""]
        if fstype == "cgroup2" and v2_mount is None and len(fields) > 4:
            v2_mount = Path(fields[4])
        elif fstype == "cgroup" and len(fields) > 4 and len(rest) > 1:
            for opt in rest[1].split(","):
                v1_mounts.setdefault(opt, Path(fields[4]))
    dirs: list[CgroupDir] = []
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if not relative:
            continue  # the root cgroup: its numbers are the whole host's
        if not controllers:
            if v2_mount is not None:
                dirs.append(CgroupDir(version="v2", path=v2_mount / relative))
            continue
        names = [c for c in controllers.split(",") if c]
        mount = next((v1_mounts[c] for c in names if c in v1_mounts), None)
        if mount is not None:
            dirs.append(CgroupDir(version="v1", path=mount / relative, controllers=names))
    in_v1 = {c for d in dirs if d.version == "v1" for c in d.controllers}
    if v2_mount is not None:
        with contextlib.suppress(OSError):
            offered = (v2_mount / "cgroup.controllers").read_text().split()
            in_v2 = [c for c in offered if c in _CONTROLLERS and c not in in_v1]
            dirs = [
                msgspec.structs.replace(d, controllers=in_v2) if d.version == "v2" else d
                for d in dirs
            ]
    return dirs


class CgroupReader:
    def __init__(self, dirs: list[CgroupDir]) -> None:
        self.dirs = dirs

    def oom_kills(self) -> int:
        total = 0
        for d in self.dirs:
            if "memory" in d.controllers:
                events = "memory.events" if d.version == "v2" else "memory.oom_control"
                total += _keyed(d.path / events, "oom_kill") or 0
        return total

    def stats(self) -> SandboxStats:
        cpu_s = 0.0
        memory = 0
        limit: int | None = None
        pids = 0
        for d in self.dirs:
            if d.version == "v2":
                usage = _keyed(d.path / "cpu.stat", "usage_usec")
                if usage is not None:
                    cpu_s = usage / 1e6
            elif "cpuacct" in d.controllers or "cpu" in d.controllers:
                usage_ns = _read_int(d.path / "cpuacct.usage")
                if usage_ns is not None:
                    cpu_s = usage_ns / 1e9
            if "memory" in d.controllers:
                current = "memory.current" if d.version == "v2" else "memory.usage_in_bytes"
                maximum = "memory.max" if d.version == "v2" else "memory.limit_in_bytes"
                memory = _read_int(d.path / current) or 0
                limit = _read_int(d.path / maximum)
            if "pids" in d.controllers:
                pids = _read_int(d.path / "pids.current") or 0
        if not pids:
            pids = len(self.pids())
        return SandboxStats(
            cpu_seconds=round(cpu_s, 6),
            memory_bytes=memory,
            memory_limit_bytes=limit,
            pids=pids,
            oom_kills=self.oom_kills(),
        )

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (d.path / "cgroup.procs").read_text().split())
        return found

    def frozen(self) -> bool:
        """Whether the sandbox's cgroup v2 directory is frozen."""
        return any(
            _keyed(d.path / "cgroup.events", "frozen") == 1 for d in self.dirs if d.version == "v2"
        )

    def freeze(self, frozen: bool, timeout_s: float = 10.0) -> None:
        """Freezes (or thaws) every process in the sandbox's cgroup v2 directory and waits
        until the kernel says so (`cgroup.events`). Memory stays where it is."""
        v2 = [d for d in self.dirs if d.version == "v2"]
        if not v2:
            raise SandboxError("freezing needs the sandbox in a cgroup v2 directory")
        path = v2[0].path
        (path / "cgroup.freeze").write_text("1" if frozen else "0")
        deadline = time.monotonic() + timeout_s
        while _keyed(path / "cgroup.events", "frozen") != int(frozen):
            if time.monotonic() >= deadline:
                raise SandboxError(
                    f"{path} did not {'freeze' if frozen else 'thaw'} within {timeout_s:g} s"
                )
            time.sleep(0.002)

    def kill_all(self, owner: str) -> bool:
        """SIGKILL to every process in the sandbox's cgroup, queued before this returns:
        with cgroup v2's `cgroup.kill` all at once, else to each listed process (a fork
        racing the listing is taken by the PID namespace's end). Only a cgroup whose
        every directory is named for `owner` (a sandbox id): False, nothing killed, for
        one that may be shared (a backend that could not make its own)."""
        if not self.dirs or not all(owner in d.path.name for d in self.dirs):
            return False
        for d in self.dirs:
            if d.version == "v2" and (d.path / "cgroup.kill").exists():
                (d.path / "cgroup.kill").write_text("1")
                return True
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return True

    def kill_and_remove(self, timeout_s: float = 5.0) -> None:
        """SIGKILLs whatever is left and removes the directories (leftovers of a crash)."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        for d in self.dirs:
            while d.path.exists():
                try:
                    d.path.rmdir()
                except OSError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)


class OomAwareExecution:
    """Marks an exit as `oom_killed` when the process died of SIGKILL while the
    sandbox's cgroup counted a new OOM kill."""

    def __init__(self, inner: Execution, oom_kills: Callable[[], int]) -> None:
        self._inner = inner
        self._oom_kills = oom_kills
        self._before = oom_kills()

    @property
    def pid(self) -> int:
        return self._inner.pid

    def _mark(self, exit_: ExitStatus) -> ExitStatus:
        if exit_.signal == signal.SIGKILL and self._oom_kills() > self._before:
            return msgspec.structs.replace(exit_, oom_killed=True)
        return exit_

    def _lost(self, error: SandboxError) -> ExitStatus:
        """The sandbox died under the process (gVisor: the host OOM killer takes the
        whole sandbox): an OOM kill if the cgroup counted one, else the error stands."""
        if self._oom_kills() > self._before:
            return ExitStatus(pid=self.pid, signal=signal.SIGKILL, oom_killed=True)
        raise SandboxError(f"the sandbox died while process {self.pid} ran: {error}") from error

    async def events(self) -> AsyncIterator[ExecEvent]:
        try:
            async for event in self._inner.events():
                yield self._mark(event) if isinstance(event, ExitStatus) else event
        except SandboxError as e:
            yield self._lost(e)

    async def write_stdin(self, data: bytes) -> None:
        await self._inner.write_stdin(data)

    async def close_stdin(self) -> None:
        await self._inner.close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        await self._inner.resize(rows, cols)

    async def kill(self, signal: int = 9) -> None:
        await self._inner.kill(signal)

    async def wait(self) -> ExecResult:
        try:
            result = await self._inner.wait()
        except SandboxError as e:
            return ExecResult(stdout=b"", stderr=b"", exit=self._lost(e))
        return ExecResult(stdout=result.stdout, stderr=result.stderr, exit=self._mark(result.exit))
