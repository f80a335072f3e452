"""The microVM backend: one `tartarus-vmm` process (our Rust VMM on KVM) per sandbox.

A sandbox is a VMM process under `<runtime_dir>/microvm/<id>/` booting the template's
guest kernel, or restored from a snapshot (Nyx). Lifecycle (start, status, stats,
snapshot, restore, stop, kill, reap) goes through the VMM's control socket
(`vmm_api.VmmProcess`). Running commands needs the guest agent over virtio-vsock,
which the VMM does not have yet, so those operations raise `NotSupportedError`. On
hosts whose KVM cannot run a full guest (the doctor decides) `create` raises
`BackendUnavailableError` with the doctor's reason; `restore` only needs a KVM it can
open, since a restored guest does not boot.

A snapshot is one file, `vm.snap` (`rust/vmm/src/snapshot/format.rs`). A sandbox that
was itself restored from a snapshot takes diff snapshots against that snapshot (only
the pages it changed); `SnapshotInfo.base` then names the parent.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import anyio

from tartarus.config import Settings, load_settings
from tartarus.host.doctor import DoctorReport, run_doctor
from tartarus.runtime.base import (
    BackendUnavailableError,
    Execution,
    NotSupportedError,
    SandboxError,
)
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    FileInfo,
    LogEntry,
    ProcessInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
)
from tartarus.runtime.vmm_api import (
    MachineConfig,
    RestoreOptions,
    RestoreReport,
    SerialFile,
    SnapshotKind,
    VmmProcess,
    VmState,
)

# Console on COM1, reboot through the i8042 (the VMM turns it into an exit), no
# PCI or ACPI probing: the microVM has neither.
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux"

_STATES = {
    VmState.NOT_CONFIGURED: SandboxState.CREATED,
    VmState.CONFIGURED: SandboxState.CREATED,
    VmState.RUNNING: SandboxState.RUNNING,
    VmState.PAUSED: SandboxState.PAUSED,
}
_CLEAN_EXITS = {"reset", "shutdown", "halt", "stopped"}
SNAPSHOT_FILE = "vm.snap"


def clone_id_of(sandbox_id: str) -> int:
    """The number a restored guest reads as its clone id: the sandbox id's 64 bits."""
    digits = sandbox_id.removeprefix("sb-")
    try:
        return int(digits, 16) & (2**64 - 1)
    except ValueError:
        return int.from_bytes(sandbox_id.encode()[:8].ljust(8, b"\0"), "little")


def _file_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


class MicroVmRuntime:
    """The microVM backend on this host. `kernel` is the guest kernel to boot."""

    def __init__(
        self,
        *,
        kernel: Path | None = None,
        settings: Settings | None = None,
        doctor: DoctorReport | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.kernel = kernel
        self._doctor = doctor
        # Snapshot files whose guest memory this process checked once; later restores
        # of the same (unchanged) file skip reading all of it again.
        self._verified: set[tuple[str, int, int, int]] = set()

    @property
    def backend(self) -> Backend:
        return Backend.MICROVM

    @property
    def sandboxes_dir(self) -> Path:
        return self.settings.runtime_dir / "microvm"

    def _require_available(self) -> Path:
        doctor = self._doctor or run_doctor(self.settings)
        verdict = doctor.backend("microvm")
        if not verdict.available:
            raise BackendUnavailableError(f"microvm backend unavailable: {verdict.reason}")
        if self.kernel is None or not self.kernel.is_file():
            raise BackendUnavailableError(
                f"microvm backend has no guest kernel (got {self.kernel}); build or "
                "configure one for the template"
            )
        return self.kernel

    async def create(self, spec: SandboxSpec) -> MicroVmSandbox:
        kernel = self._require_available()
        return MicroVmSandbox(spec, kernel, self.sandboxes_dir / spec.id)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> MicroVmSandbox:
        """Starts a VMM restored from `snapshot` (running: a restored guest needs no
        `start`). The guest reads the sandbox id as its clone id."""
        if snapshot.backend is not Backend.MICROVM:
            raise SandboxError(f"a {snapshot.backend.value} snapshot cannot restore a microVM")
        kvm = (self._doctor or run_doctor(self.settings)).kernel.kvm
        if not kvm.openable:
            raise BackendUnavailableError(f"microvm restore needs /dev/kvm: {kvm.detail}")
        files = [snapshot.path] + ([snapshot.base] if snapshot.base else [])
        try:
            keys = [_file_key(f) for f in files]
        except OSError as e:
            raise SandboxError(f"snapshot {snapshot.path} cannot be read: {e}") from e
        verify = not all(k in self._verified for k in keys)
        sandbox = MicroVmSandbox(spec, None, self.sandboxes_dir / spec.id)
        await sandbox.start_restored(snapshot, verify_memory=verify)
        self._verified.update(keys)
        return sandbox

    async def reap(self, keep: set[str]) -> list[str]:
        """Kills VMM processes left by a previous server and removes their directories."""
        removed: list[str] = []
        if not self.sandboxes_dir.is_dir():
            return removed
        for workdir in sorted(self.sandboxes_dir.iterdir()):
            if workdir.name in keep or not workdir.is_dir():
                continue
            _kill_recorded_vmm(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir.name)
        return removed


def _kill_recorded_vmm(workdir: Path) -> None:
    """Kills the VMM whose pid is recorded in `workdir`, if that pid is still our VMM."""
    try:
        pid = int((workdir / "vmm.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"tartarus-vmm" in cmdline and str(workdir).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class MicroVmSandbox:
    def __init__(self, spec: SandboxSpec, kernel: Path | None, workdir: Path) -> None:
        self.spec = spec
        self.kernel = kernel
        self.workdir = workdir
        self._vmm: VmmProcess | None = None
        # Set when restored: the full snapshot memory maps, and what the restore said.
        self.restored_from: Path | None = None
        self.restore_report: RestoreReport | None = None

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def backend(self) -> Backend:
        return Backend.MICROVM

    def machine_config(self) -> MachineConfig:
        if self.kernel is None:
            raise SandboxError(f"sandbox {self.id} has no guest kernel to boot")
        return MachineConfig(
            vcpus=max(1, math.ceil(self.spec.resources.vcpus)),
            memory_mib=self.spec.resources.memory_mib,
            kernel=self.kernel,
            cmdline=DEFAULT_CMDLINE,
            serial=SerialFile(path=self.workdir / "console.log"),
        )

    async def start(self) -> None:
        if self._vmm is not None:
            raise SandboxError(f"sandbox {self.id} is already started")
        self._vmm = await VmmProcess.launch(self.workdir)
        try:
            await self._vmm.configure(self.machine_config())
            await self._vmm.start()
        except SandboxError:
            await self.kill()
            raise

    async def start_restored(self, snapshot: SnapshotInfo, *, verify_memory: bool) -> None:
        """Launches a VMM and restores `snapshot` (a full one, or a diff on its base)."""
        if self._vmm is not None:
            raise SandboxError(f"sandbox {self.id} is already started")
        self._vmm = await VmmProcess.launch(self.workdir)
        options = RestoreOptions(
            snapshot=snapshot.path,
            base=snapshot.base,
            serial=SerialFile(path=self.workdir / "console.log"),
            clone_id=clone_id_of(self.id),
            verify_memory=verify_memory,
        )
        try:
            _, self.restore_report = await self._vmm.restore(options)
        except SandboxError:
            await self.kill()
            raise
        self.restored_from = snapshot.base or snapshot.path

    async def status(self) -> SandboxStatus:
        if self._vmm is None:
            return SandboxStatus(id=self.id, backend=self.backend, state=SandboxState.CREATED)
        if self._vmm.process.returncode is not None:
            return SandboxStatus(
                id=self.id,
                backend=self.backend,
                state=SandboxState.STOPPED,
                detail=f"VMM exited with status {self._vmm.process.returncode}",
            )
        report = await self._vmm.state()
        if report.state is VmState.EXITED:
            exit_reason = report.exit.reason if report.exit else "unknown"
            clean = exit_reason in _CLEAN_EXITS
            state = SandboxState.STOPPED if clean else SandboxState.FAILED
            return SandboxStatus(id=self.id, backend=self.backend, state=state, detail=exit_reason)
        return SandboxStatus(id=self.id, backend=self.backend, state=_STATES[report.state])

    async def stats(self) -> SandboxStats:
        if self._vmm is None:
            raise SandboxError(f"sandbox {self.id} is not started")
        m = await self._vmm.metrics()
        return SandboxStats(
            cpu_seconds=m.cpu_us / 1e6,
            memory_bytes=m.max_rss_bytes,
            memory_limit_bytes=m.guest_memory_bytes,
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._vmm is not None:
            await self._vmm.stop(timeout_s=grace_s)
        self._cleanup()

    async def kill(self) -> None:
        if self._vmm is not None:
            await self._vmm.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    # The guest agent is reached over virtio-vsock, which the VMM does not offer yet.
    async def exec(self, request: ExecRequest) -> Execution:
        raise NotSupportedError(Backend.MICROVM, "exec")

    async def processes(self) -> list[ProcessInfo]:
        raise NotSupportedError(Backend.MICROVM, "processes")

    async def attach(self, pid: int) -> Execution:
        raise NotSupportedError(Backend.MICROVM, "attach")

    async def kill_process(self, pid: int, signal: int = 9) -> None:
        raise NotSupportedError(Backend.MICROVM, "kill_process")

    async def logs(self, *, follow: bool = False, since_seq: int = 0) -> AsyncIterator[LogEntry]:
        raise NotSupportedError(Backend.MICROVM, "logs")
        yield  # pragma: no cover

    async def read_file(self, path: str) -> bytes:
        raise NotSupportedError(Backend.MICROVM, "read_file")

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        raise NotSupportedError(Backend.MICROVM, "write_file")

    async def download(self, path: str) -> AsyncIterator[bytes]:
        raise NotSupportedError(Backend.MICROVM, "download")
        yield  # pragma: no cover

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        raise NotSupportedError(Backend.MICROVM, "upload")

    async def list_dir(self, path: str) -> list[FileInfo]:
        raise NotSupportedError(Backend.MICROVM, "list_dir")

    async def stat(self, path: str) -> FileInfo:
        raise NotSupportedError(Backend.MICROVM, "stat")

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        raise NotSupportedError(Backend.MICROVM, "make_dir")

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        raise NotSupportedError(Backend.MICROVM, "remove")

    async def rename(self, src: str, dst: str) -> None:
        raise NotSupportedError(Backend.MICROVM, "rename")

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        """Writes `dest_dir/vm.snap`: a diff against the snapshot this sandbox was
        restored from (if that file is still there), else a full snapshot. The guest
        keeps running."""
        if self._vmm is None:
            raise SandboxError(f"sandbox {self.id} is not started")
        await anyio.Path(dest_dir).mkdir(parents=True, exist_ok=True)
        base = self.restored_from if self.restored_from and self.restored_from.exists() else None
        kind = SnapshotKind.DIFF if base else SnapshotKind.FULL
        report = await self._vmm.snapshot(dest_dir / SNAPSHOT_FILE, kind)
        return SnapshotInfo(
            backend=Backend.MICROVM,
            path=report.path,
            size_bytes=report.file_bytes,
            source_sandbox=self.id,
            base=base,
        )
