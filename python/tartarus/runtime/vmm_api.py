"""Control of one `tartarus-vmm` process (the microVM monitor, "the pit"): the wire
types of its JSON API (mirrors of `rust/vmm/src/{api,config}.rs`), `VmmProcess`,
which launches the binary (in its jail, see `vmm_jail`) and drives it through
`tartarus._core.VmmClient`, and `jail_machine`, which turns a machine's host paths into
the jailed VMM's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

from tartarus import _core, codec
from tartarus.binaries import find_binary
from tartarus.runtime.base import SandboxError
from tartarus.runtime.vmm_jail import BindMount, JailConfig

DEFAULT_SERIAL_LIMIT = 16 << 20
# How long a jail supervisor gets to kill its VMM and remove the cgroup.
JAIL_TEARDOWN_S = 10.0


class SerialNone(msgspec.Struct, frozen=True, tag="none", tag_field="kind"):
    pass


class SerialFile(msgspec.Struct, frozen=True, tag="file", tag_field="kind"):
    path: Path


class SerialSocket(msgspec.Struct, frozen=True, tag="socket", tag_field="kind"):
    path: Path


class SerialStdout(msgspec.Struct, frozen=True, tag="stdout", tag_field="kind"):
    pass


SerialConfig = SerialNone | SerialFile | SerialSocket | SerialStdout


class BootProtocol(StrEnum):
    AUTO = "auto"
    LINUX64 = "linux64"
    PVH = "pvh"


class CpuTemplate(StrEnum):
    HOST = "host"
    BASELINE = "baseline"


class MemoryBacking(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    file: Path | None = None
    hugepages: bool = False


class RateLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token buckets for a disk: None means unlimited; bursts add to one second's worth."""

    bytes_per_sec: int | None = None
    ops_per_sec: int | None = None
    burst_bytes: int = 0
    burst_ops: int = 0


class Wipe(StrEnum):
    UNLINK = "unlink"
    SHRED = "shred"


class ScratchConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A Lethe scratch disk: created (or adopted when `size_mib` is None) and wiped on exit."""

    size_mib: int | None = None
    wipe: Wipe = Wipe.UNLINK


class DriveConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A virtio-blk disk; the first drive is the guest's /dev/vda."""

    path: Path
    read_only: bool = False
    id: str = ""
    rate_limit: RateLimit = msgspec.field(default_factory=RateLimit)
    scratch: ScratchConfig | None = None


class VsockConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """virtio-vsock: host programs connect to `uds_path` and send `CONNECT <port>\\n`."""

    guest_cid: int
    uds_path: Path


class MachineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    memory_mib: int
    kernel: Path
    vcpus: int = 1
    cmdline: str = ""
    boot_protocol: BootProtocol = BootProtocol.AUTO
    cpu_template: CpuTemplate = CpuTemplate.BASELINE
    serial: SerialConfig = SerialNone()
    serial_limit_bytes: int = DEFAULT_SERIAL_LIMIT
    memory: MemoryBacking = msgspec.field(default_factory=MemoryBacking)
    wall_clock_limit_ms: int | None = None
    drives: list[DriveConfig] = msgspec.field(default_factory=list)
    vsock: VsockConfig | None = None
    track_dirty_pages: bool = False


class VmExit(msgspec.Struct, frozen=True, kw_only=True):
    """Why the guest stopped; `reason` decides which other fields are set."""

    reason: str
    vcpu: int | None = None
    detail: str | None = None
    limit_ms: int | None = None
    suberror: int | None = None
    data: list[int] | None = None
    rip: int | None = None
    hardware_reason: int | None = None
    errno: int | None = None
    message: str | None = None
    exit: str | None = None


class VmState(StrEnum):
    NOT_CONFIGURED = "not_configured"
    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


class StateReport(msgspec.Struct, frozen=True, kw_only=True):
    state: VmState
    exit: VmExit | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    entry: Literal["linux64", "pvh"] | None = None
    # Only in the answer to `stop`: whether every vCPU thread ended in time.
    clean: bool | None = None


class VmmMetrics(msgspec.Struct, frozen=True, kw_only=True):
    uptime_us: int
    cpu_us: int
    max_rss_bytes: int
    guest_memory_bytes: int
    start_us: int | None = None
    first_exit_us: int | None = None
    first_exit_cpu_us: int | None = None
    exits_io_in: int = 0
    exits_io_out: int = 0
    exits_mmio_read: int = 0
    exits_mmio_write: int = 0
    exits_interrupted: int = 0
    unclaimed_pio_reads: int = 0
    unclaimed_pio_writes: int = 0
    unclaimed_mmio_reads: int = 0
    unclaimed_mmio_writes: int = 0
    serial_bytes: int = 0
    serial_dropped_bytes: int = 0


class SnapshotKind(StrEnum):
    FULL = "full"
    DIFF = "diff"


class SnapshotReport(msgspec.Struct, frozen=True, kw_only=True):
    """What the VMM's `snapshot` wrote (`rust/vmm/src/snapshot/mod.rs`)."""

    path: Path
    id: str
    kind: SnapshotKind
    parent: str | None = None
    file_bytes: int
    memory_bytes: int
    pages: int
    vcpus: int
    duration_us: int


class RestoreOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `restore` request: a full snapshot, or a diff and its `base`."""

    snapshot: Path
    base: Path | None = None
    serial: SerialConfig | None = None
    wall_clock_limit_ms: int | None = None
    track_dirty_pages: bool | None = None
    # This clone's disks (the snapshot's, in order; scratch disks are its own copies).
    drives: list[DriveConfig] | None = None
    vsock_uds_path: Path | None = None
    clone_id: int = 0
    verify_memory: bool = True
    resume: bool = True


class RestoreReport(msgspec.Struct, frozen=True, kw_only=True):
    snapshot_id: str
    kind: SnapshotKind
    base_id: str | None = None
    generation: int
    clone_id: int
    vm_id: str
    memory_verified: bool
    duration_us: int


# The jailed VMM's writable directory: the serial log, the vsock socket, scratch disks.
JAIL_RUN_DIR = "/run"
JAIL_KERNEL = "/boot/vmlinux"
JAIL_MEMORY = "/boot/memory"
JAIL_SNAPSHOT = "/snapshot/vm.snap"
JAIL_SNAPSHOT_BASE = "/snapshot/base.snap"


class JailPaths:
    """Host paths as a jailed VMM sees them, and the bind mounts that make it so.

    `run_dir` (host) is bound writable at `/run`: files the VMM creates or removes (the
    serial log, the vsock socket, scratch disks, snapshots it writes) must live there.
    Other files (the kernel, a memory file, drives, snapshots it restores, a serial
    socket) are bound one by one, read-only unless the VMM writes them.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.mounts = [BindMount(source=run_dir, destination=JAIL_RUN_DIR, readonly=False)]
        self._home = run_dir.absolute()

    def _in_run_dir(self, path: Path) -> Path | None:
        if path.absolute().parent == self._home:
            return Path(JAIL_RUN_DIR) / path.name
        return None

    def bound(self, path: Path, destination: str, *, readonly: bool = True) -> Path:
        inside = self._in_run_dir(path)
        if inside is not None:
            return inside
        self.mounts.append(BindMount(source=path, destination=destination, readonly=readonly))
        return Path(destination)

    def created(self, path: Path, what: str) -> Path:
        inside = self._in_run_dir(path)
        if inside is None:
            raise SandboxError(
                f"{what} {path} must be in the VMM's run directory {self.run_dir} when the "
                "VMM is jailed: it creates or removes it there"
            )
        return inside

    def serial(self, serial: SerialConfig) -> SerialConfig:
        if isinstance(serial, SerialFile):
            return SerialFile(path=self.created(serial.path, "the serial log"))
        if isinstance(serial, SerialSocket):
            return SerialSocket(path=self.bound(serial.path, "/serial.sock", readonly=False))
        return serial

    def drives(self, drives: list[DriveConfig]) -> list[DriveConfig]:
        return [
            msgspec.structs.replace(
                d,
                path=self.created(d.path, "scratch disk")
                if d.scratch is not None
                else self.bound(d.path, f"/drives/{i}", readonly=d.read_only),
            )
            for i, d in enumerate(drives)
        ]


def jail_machine(machine: MachineConfig, run_dir: Path) -> tuple[MachineConfig, list[BindMount]]:
    """The machine as a jailed VMM sees it, and the bind mounts that make it so."""
    paths = JailPaths(run_dir)
    memory = machine.memory
    if memory.file is not None:
        memory = msgspec.structs.replace(memory, file=paths.bound(memory.file, JAIL_MEMORY))
    vsock = machine.vsock
    if vsock is not None:
        uds_path = paths.created(vsock.uds_path, "the vsock socket")
        vsock = msgspec.structs.replace(vsock, uds_path=uds_path)
    jailed = msgspec.structs.replace(
        machine,
        kernel=paths.bound(machine.kernel, JAIL_KERNEL),
        serial=paths.serial(machine.serial),
        memory=memory,
        drives=paths.drives(machine.drives),
        vsock=vsock,
    )
    return jailed, paths.mounts


def jail_restore(options: RestoreOptions, run_dir: Path) -> tuple[RestoreOptions, list[BindMount]]:
    """A restore as a jailed VMM sees it (snapshots bound read-only), and its mounts."""
    paths = JailPaths(run_dir)
    vsock = options.vsock_uds_path
    jailed = msgspec.structs.replace(
        options,
        snapshot=paths.bound(options.snapshot, JAIL_SNAPSHOT),
        base=paths.bound(options.base, JAIL_SNAPSHOT_BASE) if options.base else None,
        serial=paths.serial(options.serial) if options.serial else None,
        drives=paths.drives(options.drives) if options.drives is not None else None,
        vsock_uds_path=paths.created(vsock, "the vsock socket") if vsock else None,
    )
    return jailed, paths.mounts


def check_jail_access(jail: JailConfig) -> None:
    """Raises `SandboxError` naming a bound file the jailed uid could not open: a clear
    error now rather than a refused `open` inside the VMM later."""
    for mount in jail.mounts:
        try:
            st = mount.source.stat()
        except OSError as e:
            raise SandboxError(f"cannot bind {mount.source} into the VMM's jail: {e}") from e
        need = (stat.S_IRUSR | (0 if mount.readonly else stat.S_IWUSR)) >> 6
        if stat.S_ISDIR(st.st_mode):
            need |= 1  # search
        if st.st_uid == jail.uid:
            have = (st.st_mode >> 6) & 7
        elif st.st_gid == jail.gid:
            have = (st.st_mode >> 3) & 7
        else:
            have = st.st_mode & 7
        if have & need != need:
            raise SandboxError(
                f"{mount.source} (mode {stat.filemode(st.st_mode)}, owner "
                f"{st.st_uid}:{st.st_gid}) is not {'readable' if mount.readonly else 'writable'} "
                f"by the jailed VMM's uid {jail.uid}: make it so, or run the VMM unjailed "
                '([vmm_jail] mode = "never")'
            )


def give_to_jail(run_dir: Path, jail: JailConfig) -> None:
    """Hands the run directory and the files already in it to the jail's uid/gid."""
    for path in [run_dir, *run_dir.iterdir()]:
        os.lchown(path, jail.uid, jail.gid)


class VmmError(SandboxError):
    """The VMM refused or failed a request; `kind` is the API's error category."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(f"tartarus-vmm: {message}")


class VmmProcess:
    """One `tartarus-vmm serve` process and its control socket under `workdir`."""

    def __init__(
        self,
        process: anyio.abc.Process,
        workdir: Path,
        request_timeout_s: float,
        jail: JailConfig | None = None,
    ):
        self.process = process
        self.workdir = workdir
        self.jail = jail
        self.socket = workdir / "api.sock"
        self._client = _core.VmmClient(self.socket, request_timeout_s)

    @classmethod
    async def launch(
        cls,
        workdir: Path,
        *,
        seccomp: bool = True,
        jail: JailConfig | None = None,
        startup_timeout_s: float = 10.0,
        request_timeout_s: float = 70.0,
    ) -> VmmProcess:
        """Starts the VMM (in `jail` if given; machine paths are then the jail's, see
        `jail_machine`) and waits until its socket answers."""
        await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
        socket = workdir / "api.sock"
        argv = [str(find_binary("tartarus-vmm")), "serve", "--api-sock", str(socket)]
        if not seccomp:
            argv.append("--no-seccomp")
        if jail is not None:
            check_jail_access(jail)
            jail_file = workdir / "jail.json"
            await anyio.Path(jail_file).write_bytes(codec.to_json(jail))
            argv += ["--jail", str(jail_file)]
        with (workdir / "vmm.stderr").open("wb") as stderr:
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        await anyio.Path(workdir / "vmm.pid").write_text(str(process.pid))
        vmm = cls(process, workdir, request_timeout_s, jail)
        with anyio.move_on_after(startup_timeout_s):
            while process.returncode is None:
                with contextlib.suppress(VmmError):
                    await vmm.state()
                    return vmm
                await anyio.sleep(0.002)
        await vmm.kill()
        raise VmmError(
            "startup",
            f"did not answer on {socket} within {startup_timeout_s} s "
            f"(exit status {process.returncode}): {vmm.stderr_tail()}",
        )

    def stderr_tail(self, limit: int = 4096) -> str:
        path = self.workdir / "vmm.stderr"
        try:
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - limit))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        line = codec.to_json(request).decode()
        try:
            return await anyio.to_thread.run_sync(self._client.request, line)
        except _core.VmmError as e:
            kind, message = (*e.args, "", "")[:2]
            raise VmmError(str(kind), str(message)) from e

    async def _report(self, op: str, **fields: Any) -> StateReport:
        return codec.convert(await self.request({"op": op, **fields}), StateReport)

    async def configure(self, machine: MachineConfig) -> StateReport:
        return await self._report(
            "configure", machine=msgspec.to_builtins(machine, enc_hook=codec.enc_hook)
        )

    async def start(self) -> StateReport:
        return await self._report("start")

    async def pause(self) -> StateReport:
        return await self._report("pause")

    async def resume(self) -> StateReport:
        return await self._report("resume")

    async def state(self) -> StateReport:
        return await self._report("state")

    async def wait(self, timeout_s: float) -> StateReport:
        return await self._report("wait", timeout_ms=max(0, int(timeout_s * 1000)))

    async def snapshot(self, path: Path, kind: SnapshotKind = SnapshotKind.FULL) -> SnapshotReport:
        """Writes a snapshot of the running or paused guest; the guest is left as it was."""
        answer = await self.request({"op": "snapshot", "path": str(path), "kind": kind.value})
        return codec.convert(answer["snapshot"], SnapshotReport)

    async def restore(self, options: RestoreOptions) -> tuple[StateReport, RestoreReport]:
        """Builds this (fresh) VMM's machine from a snapshot."""
        body = msgspec.to_builtins(options, enc_hook=codec.enc_hook)
        answer = await self.request({"op": "restore", **body})
        report = codec.convert(answer.pop("restore"), RestoreReport)
        return codec.convert(answer, StateReport), report

    async def metrics(self) -> VmmMetrics:
        return codec.convert(await self.request({"op": "metrics"}), VmmMetrics)

    async def stop(self, timeout_s: float = 15.0) -> StateReport | None:
        """Stops the guest and the VMM; kills the process if it does not end in time."""
        report: StateReport | None = None
        if self.process.returncode is None:
            with contextlib.suppress(VmmError):
                report = await self._report("stop")
        with anyio.move_on_after(timeout_s):
            await self.process.wait()
        await self.kill()
        return report

    async def kill(self) -> None:
        """Kills the process (idempotent) and removes the socket. A jailed VMM's
        supervisor gets SIGTERM first: it kills the jail and removes its cgroup."""
        if self.process.returncode is None and self.jail is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            with anyio.move_on_after(JAIL_TEARDOWN_S):
                await self.process.wait()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        self.socket.unlink(missing_ok=True)
