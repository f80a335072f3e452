"""The microVM backend: one `tartarus-vmm` process (our Rust VMM on KVM) per sandbox.

A sandbox is a VMM process under `<runtime_dir>/microvm/<id>/` booting the guest
kernel (`tartarus kernel build`). Running as root, the VMM enters its own jail
(`vmm_jail`, `[vmm_jail]` settings): the kernel and root image bound read-only, the
sandbox's `vm/` directory (console log, vsock socket, scratch disk) bound writable,
its own uid, a cgroup for guest RAM plus overhead. Three virtio devices:
- `/dev/vda`: the template's ext4 image (from `tartarus.images`, or made from
  `spec.rootfs`), read-only, with `/sbin/init` -> `tartarus-agent`;
- `/dev/vdb`: a per-sandbox ext4 scratch disk of `resources.disk_mib`, which the VMM
  wipes and removes when it exits (Lethe); the agent (PID 1) makes it the upper layer
  of an overlay over the read-only root (`tartarus.scratch=`), so `/` is writable;
- vsock: the agent listens on guest port 1024; the host reaches it through the hybrid
  unix socket `vm/vsock.sock` (`CONNECT 1024`).
`start` returns once the agent answers the protocol handshake over vsock. Lifecycle
(start, status, stats, stop, kill, reap) goes through the VMM's control socket
(`vmm_api.VmmProcess`); commands, processes, logs and files go to the agent
(`AgentSandbox`). On hosts whose KVM cannot run a full guest (the doctor decides)
`create` raises `BackendUnavailableError` with the doctor's reason.

Snapshots (Nyx): `snapshot(dest_dir)` pauses the guest and writes `dest_dir/vm.snap`
(`rust/vmm/src/snapshot/format.rs`) plus a sparse copy of each scratch disk
(`drive<N>.img`), then lets the guest go on. A sandbox restored from a snapshot takes a
diff against it (only the pages it changed; `SnapshotInfo.base` names the parent
directory). `restore` only needs a KVM it can open, since nothing boots: each clone
gets its own copy of the scratch disks and its own vsock socket, and reads its sandbox
id as its clone id from the generation device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec

from tartarus import _core, codec
from tartarus.config import Settings, load_settings
from tartarus.file_identity import FileIdentity, file_identity
from tartarus.guest import kernel_build
from tartarus.host.doctor import DoctorReport, run_doctor
from tartarus.host.procfs import process_alive
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient, AgentError
from tartarus.runtime.agent_sandbox import AgentSandbox
from tartarus.runtime.base import (
    BackendUnavailableError,
    SandboxError,
    refuse_network,
)
from tartarus.runtime.cgroups import remove_empty_cgroups
from tartarus.runtime.types import (
    Backend,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
)
from tartarus.runtime.vmm_api import (
    JAIL_RUN_DIR,
    JAIL_TEARDOWN_S,
    DriveConfig,
    MachineConfig,
    RestoreOptions,
    RestoreReport,
    ScratchConfig,
    SerialFile,
    SnapshotKind,
    VmmProcess,
    VmState,
    VsockConfig,
    give_to_jail,
    jail_machine,
    jail_restore,
)
from tartarus.runtime.vmm_jail import BindMount, JailConfig, sandbox_jail

log = logging.getLogger(__name__)

# Console on COM1, reboot through the i8042 (the VMM turns it into an exit), no
# PCI or ACPI probing: the microVM has neither.
# `quiet`: the kernel's boot messages cost a serial-port exit per byte (~12 s per boot under
# nested virtualisation); warnings and panics still reach the console log.
DEFAULT_CMDLINE = "console=ttyS0 quiet reboot=k panic=1 pci=off nomodule i8042.noaux"
# The root image read-only, the scratch disk for the agent's overlay root, the agent as
# PID 1 serving vsock port 1024 (after `--`, the kernel passes arguments to init).
AGENT_PORT = 1024
GUEST_CID = 3
AGENT_CMDLINE = (
    "root=/dev/vda ro rootfstype=ext4 init=/sbin/init tartarus.scratch=/dev/vdb "
    f"-- serve --init --listen vsock:{AGENT_PORT}"
)

_STATES = {
    VmState.NOT_CONFIGURED: SandboxState.CREATED,
    VmState.CONFIGURED: SandboxState.CREATED,
    VmState.RUNNING: SandboxState.RUNNING,
    VmState.PAUSED: SandboxState.PAUSED,
}
# How the guest ends when we ask it to: the VMM stops it, or the agent (PID 1) reboots it
# (`reboot=k`: the i8042 reset line; there is no ACPI to power off with). The same reset
# after a kernel panic (`panic=1`) or a reboot from inside is a failure, told apart by
# whether we asked.
_REQUESTED_EXITS = {"reset", "shutdown", "halt", "stopped"}
SNAPSHOT_FILE = "vm.snap"
# The disks as the host names them, beside a snapshot: a jailed VMM records its own view
# (`/drives/0`), which means nothing to the restore that has to bind them again.
DRIVES_FILE = "drives.json"


def clone_id_of(sandbox_id: str) -> int:
    """The number a restored guest reads as its clone id: the sandbox id's 64 bits."""
    digits = sandbox_id.removeprefix("sb-")
    try:
        return int(digits, 16) & (2**64 - 1)
    except ValueError:
        return int.from_bytes(sandbox_id.encode()[:8].ljust(8, b"\0"), "little")


async def _host_drives(snapshot_dir: Path, count: int) -> list[DriveConfig] | None:
    """The host's names for a snapshot's disks, if it was written with them."""
    try:
        raw = await anyio.Path(snapshot_dir / DRIVES_FILE).read_bytes()
    except FileNotFoundError:
        return None
    try:
        drives = codec.convert(msgspec.json.decode(raw), list[DriveConfig])
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise SandboxError(f"{snapshot_dir / DRIVES_FILE} is damaged: {e}") from e
    if len(drives) != count:
        raise SandboxError(
            f"{snapshot_dir / DRIVES_FILE} names {len(drives)} disks; the snapshot has {count}"
        )
    return drives


# The root image made from `spec.rootfs`, in the sandbox's directory.
ROOT_IMAGE = "root.ext4"


def drive_copy_name(index: int) -> str:
    return f"drive{index}.img"


async def sparse_copy(src: Path, dst: Path) -> None:
    """Copies a disk image keeping its holes (and sharing blocks where the filesystem can)."""
    result = await anyio.run_process(
        ["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)], check=False
    )
    if result.returncode != 0:
        raise SandboxError(f"cannot copy {src} to {dst}: {result.stderr.decode()[-300:]}")


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
        self._verified: set[FileIdentity] = set()

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
        kernel = self.kernel or newest_kernel(self.settings)
        if kernel is None or not kernel.is_file():
            raise BackendUnavailableError(
                f"microvm backend has no guest kernel (got {kernel}); run `tartarus kernel build`"
            )
        return kernel

    async def create(self, spec: SandboxSpec) -> MicroVmSandbox:
        refuse_network(spec, Backend.MICROVM)
        kernel = self._require_available()
        return MicroVmSandbox(spec, kernel, self.sandboxes_dir / spec.id, self.settings)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> MicroVmSandbox:
        """Starts a VMM restored from `snapshot` (a directory `snapshot()` wrote); the
        sandbox is running when this returns."""
        if snapshot.backend is not Backend.MICROVM:
            raise SandboxError(f"a {snapshot.backend.value} snapshot cannot restore a microVM")
        kvm = (self._doctor or run_doctor(self.settings)).kernel.kvm
        if not kvm.openable:
            raise BackendUnavailableError(f"microvm restore needs /dev/kvm: {kvm.detail}")
        files = [d / SNAPSHOT_FILE for d in (snapshot.path, snapshot.base) if d is not None]
        try:
            keys = [file_identity(f) for f in files]
        except OSError as e:
            raise SandboxError(f"snapshot {snapshot.path} cannot be read: {e}") from e
        verify = not all(k in self._verified for k in keys)
        sandbox = MicroVmSandbox(spec, None, self.sandboxes_dir / spec.id, self.settings)
        await sandbox.start_restored(snapshot, verify_memory=verify)
        self._verified.update(keys)
        return sandbox

    async def reattach(self, spec: SandboxSpec) -> MicroVmSandbox | None:
        """None: re-attaching to a monitor a dead server left is not built yet (its
        vsock socket would allow it); the restart reaps it."""
        return None

    async def reap(self, keep: set[str]) -> list[str]:
        """Kills VMM processes left by a previous server and removes their directories
        (and, when nothing is kept, the jails' empty parent cgroups)."""
        removed: list[str] = []
        if not keep:
            await anyio.to_thread.run_sync(
                remove_empty_cgroups, self.settings.vmm_jail.cgroup_parent
            )
        if not self.sandboxes_dir.is_dir():
            return removed
        for workdir in sorted(self.sandboxes_dir.iterdir()):
            if workdir.name in keep or not workdir.is_dir():
                continue
            await _kill_recorded_vmm(workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir.name)
        return removed


def newest_kernel(settings: Settings) -> Path | None:
    """The most recently built guest kernel in the cache, if any."""
    kernels = kernel_build.list_kernels(settings.cache_dir)
    if not kernels:
        return None
    return kernel_build.kernel_dir(settings.cache_dir, kernels[0].id) / "vmlinux"


async def make_scratch_disk(path: Path, size_mib: int) -> Path:
    """A sparse, freshly formatted ext4 disk (the guest has no mkfs of its own)."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/sbin:/usr/sbin")
    if mkfs is None:
        raise SandboxError("mkfs.ext4 not found (apt-get install e2fsprogs)")
    with path.open("xb") as f:
        f.truncate(size_mib << 20)
    result = await anyio.run_process(
        [mkfs, "-q", "-F", "-L", "scratch", "-m", "0", str(path)], check=False
    )
    if result.returncode != 0:
        raise SandboxError(f"cannot format scratch disk {path}: {result.stderr.decode()[-500:]}")
    return path


async def wait_for_agent(
    uds: Path,
    *,
    timeout_s: float,
    port: int = AGENT_PORT,
    ended: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """Returns once the guest accepts a vsock connection on `port` (through the
    device's hybrid socket), raising `SandboxError` after `timeout_s`, or as soon as
    `ended` (polled now and then) says why the guest is gone."""
    last = "no attempt"
    polls = 0
    with anyio.move_on_after(timeout_s):
        while True:
            polls += 1
            if ended is not None and polls % 10 == 0 and (why := await ended()):
                raise SandboxError(f"the guest ended before its agent answered: {why}")
            try:
                async with await anyio.connect_unix(uds) as stream:
                    await stream.send(f"CONNECT {port}\n".encode())
                    with anyio.fail_after(5):
                        reply = await stream.receive(64)
                    if reply.startswith(b"OK "):
                        return
                    last = f"answer {reply[:32]!r}"
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError, TimeoutError) as e:
                last = f"{type(e).__name__}: {e}"
            await anyio.sleep(0.05)
    raise SandboxError(
        f"the guest agent did not answer on vsock port {port} within {timeout_s:.0f} s ({last})"
    )


# Fresh host entropy a restored guest's RNG is reseeded with.
RESEED_BYTES = 32


async def reseed_guest(agent: AgentClient, generation: int) -> bool:
    """Has the agent of a guest restored from a snapshot mix fresh host entropy into
    its kernel's RNG and reseed it: clones of one snapshot share their RNG state
    until then. Returns False (and logs) for an agent too old to do it; a refusal
    raises `SandboxError`, since a clone that cannot diverge must not serve."""
    if agent.hello is None or "reseed" not in agent.hello.features:
        agent_version = agent.hello.agent if agent.hello else "unknown"
        log.warning(
            "the guest agent (%s) cannot reseed its RNG after a restore; rebuild the "
            "template's snapshot with this version's agent",
            agent_version,
        )
        return False
    request = p.Reseed(entropy=secrets.token_bytes(RESEED_BYTES), generation=generation)
    try:
        await agent.call_expect(request, p.Ok)
    except AgentError as e:
        raise SandboxError(f"the restored guest could not reseed its RNG: {e}") from e
    return True


async def _kill_recorded_vmm(workdir: Path) -> None:
    """Kills the VMM whose pid is recorded in `workdir`, if that pid is still our VMM.
    A jailed VMM's supervisor gets SIGTERM first, so it removes the jail's cgroup."""
    try:
        pid = int(await anyio.Path(workdir / "vmm.pid").read_text())
        cmdline = await anyio.Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"tartarus-vmm" not in cmdline or str(workdir).encode() not in cmdline:
        return
    if b"\0--jail\0" in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        for _ in range(int(JAIL_TEARDOWN_S / 0.01)):
            if not process_alive(pid):
                break
            await anyio.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def guest_cmdline(extra: str = "") -> str:
    """The guest kernel's command line: ours, the `guest_kernel_args` setting, the agent's."""
    return " ".join(part for part in (DEFAULT_CMDLINE, extra.strip(), AGENT_CMDLINE) if part)


def classify_exit(
    reason: str, requested: bool, detail: str | None = None
) -> tuple[SandboxState, str]:
    """What a guest's exit means: `stopped` is always ours; a reset, shutdown or halt is
    a clean stop only after we asked for one, else the guest crashed (a panicking kernel
    resets it, a triple fault shuts it down) or rebooted itself. `detail` is what the
    VMM saw (for a triple fault, where the vCPU was): it goes into the message."""
    seen = f" ({detail})" if detail else ""
    if reason == "stopped" or (requested and reason in _REQUESTED_EXITS):
        return SandboxState.STOPPED, reason
    if reason in _REQUESTED_EXITS:
        return (
            SandboxState.FAILED,
            f"guest ended by itself ({reason}): a kernel panic or a reboot inside{seen}",
        )
    return SandboxState.FAILED, f"{reason}{seen}"


class MicroVmSandbox(AgentSandbox):
    def __init__(
        self,
        spec: SandboxSpec,
        kernel: Path | None,
        workdir: Path,
        settings: Settings | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.kernel = kernel
        self.workdir = workdir
        self.settings = settings or load_settings()
        self._vmm: VmmProcess | None = None
        self._template_owner: str | None = None
        self._drives: list[DriveConfig] = []
        self._jailed = False
        # Set once we ask the guest to end: only then is a reset a clean stop.
        self._ending = False
        # Set when restored: the snapshot directory whose memory this guest maps (the
        # parent of its diffs), and what the restore reported.
        self.restored_from: Path | None = None
        self.restore_report: RestoreReport | None = None

    @property
    def run_dir(self) -> Path:
        """What the VMM writes: console log, vsock socket, scratch disk (its jail's /run)."""
        return self.workdir / "vm"

    @property
    def vsock_path(self) -> Path:
        return self.run_dir / "vsock.sock"

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def backend(self) -> Backend:
        return Backend.MICROVM

    def machine_config(self, root_image: Path, scratch_disk: Path) -> MachineConfig:
        if self.kernel is None:
            raise SandboxError(f"sandbox {self.id} has no guest kernel to boot")
        return MachineConfig(
            vcpus=max(1, math.ceil(self.spec.resources.vcpus)),
            memory_mib=self.spec.resources.memory_mib,
            kernel=self.kernel,
            cmdline=guest_cmdline(self.settings.guest_kernel_args),
            serial=SerialFile(path=self.run_dir / "console.log"),
            drives=[
                DriveConfig(path=root_image, read_only=True, id="tartarus-root"),
                DriveConfig(path=scratch_disk, id="tartarus-scratch", scratch=ScratchConfig()),
            ],
            vsock=VsockConfig(guest_cid=GUEST_CID, uds_path=self.vsock_path),
        )

    def confine(self, machine: MachineConfig) -> tuple[MachineConfig, JailConfig | None]:
        """The machine as the VMM will see it and its jail (None when `[vmm_jail]`
        says the VMM runs unjailed: by default, when not running as root)."""
        if not self.settings.vmm_jail.enabled():
            return machine, None
        jailed, mounts = jail_machine(machine, self.run_dir)
        return jailed, self._jail(mounts, machine.memory_mib)

    def confine_restore(
        self, options: RestoreOptions, memory_mib: int
    ) -> tuple[RestoreOptions, JailConfig | None]:
        """A restore as the VMM will see it, and its jail (as `confine`)."""
        if not self.settings.vmm_jail.enabled():
            return options, None
        jailed, mounts = jail_restore(options, self.run_dir)
        return jailed, self._jail(mounts, memory_mib)

    def _jail(self, mounts: list[BindMount], memory_mib: int) -> JailConfig:
        jail = sandbox_jail(
            self.settings.vmm_jail,
            sandbox_id=self.id,
            workdir=self.workdir,
            runtime_dir=self.settings.runtime_dir,
            mounts=mounts,
            guest_memory_mib=memory_mib,
            vcpus=self.spec.resources.vcpus,
        )
        give_to_jail(self.run_dir, jail)
        return jail

    async def root_image(self) -> Path:
        """The read-only root: an image of `spec.rootfs`, or the template's ext4 image."""
        if self.spec.rootfs is not None:
            from tartarus.images.rootfs import make_ext4  # noqa: PLC0415 - images is heavy

            image = self.workdir / ROOT_IMAGE
            seed = hashlib.sha256(str(self.spec.rootfs.resolve()).encode()).hexdigest()
            await make_ext4(self.spec.rootfs, image, seed=seed, progress=lambda _: None)
            return image
        from tartarus.images.store import TemplateStore  # noqa: PLC0415

        self._template_owner = f"sandbox:{self.id}"
        resolved = await TemplateStore(self.settings).resolve(
            self.spec.template, ext4=True, owner=self._template_owner
        )
        if resolved.ext4 is None:
            raise SandboxError(f"template {self.spec.template} has no ext4 image")
        return resolved.ext4

    async def start(self) -> None:
        if self._vmm is not None:
            raise SandboxError(f"sandbox {self.id} is already started")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            root = await self.root_image()
            scratch = await make_scratch_disk(
                self.run_dir / "scratch.ext4", self.spec.resources.disk_mib
            )
            host_machine = self.machine_config(root, scratch)
            machine, jail = self.confine(host_machine)
            self._drives = host_machine.drives
            self._jailed = jail is not None
            self._vmm = await VmmProcess.launch(self.workdir, jail=jail)
            await self._vmm.configure(machine)
            await self._vmm.start()
            await self._wait_for_agent()
            self.agent = await AgentClient.connect_hybrid_vsock(self.vsock_path, AGENT_PORT)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise

    async def _wait_for_agent(self) -> None:
        """Waits for the guest's agent; a guest that dies or never answers is an error
        that carries the end of its console, where the kernel says why."""
        try:
            await wait_for_agent(
                self.vsock_path, timeout_s=self.settings.guest_ready_timeout_s, ended=self._ended
            )
        except SandboxError as e:
            raise SandboxError(f"{e}\n{await self._progress()}{self.console_tail()}") from e

    async def _progress(self) -> str:
        """What the VMM has seen of a guest that has not answered: whether it ran, stalled
        before its first exit, or spun; empty when the VMM is gone."""
        if self._vmm is None:
            return ""
        try:
            m = await self._vmm.metrics()
        except (SandboxError, OSError):
            return ""
        exits = m.exits_io_in + m.exits_io_out + m.exits_mmio_read + m.exits_mmio_write
        first = "none yet" if m.first_exit_us is None else f"{m.first_exit_us / 1e6:.1f} s in"
        return (
            f"VMM: up {m.uptime_us / 1e6:.1f} s, {m.cpu_us / 1e6:.1f} s of CPU, {exits} "
            f"device exits (first: {first}), {m.serial_bytes} console bytes\n"
        )

    async def _ended(self) -> str | None:
        """Why the guest is gone (as `status` words it), or None while it may still run."""
        try:
            status = await self.status()
        except SandboxError:
            return None
        if status.state in (SandboxState.STOPPED, SandboxState.FAILED):
            return status.detail or status.state.value
        return None

    def console_tail(self, lines: int = 25) -> str:
        """The last lines of the guest's console, for error messages."""
        try:
            text = (self.run_dir / "console.log").read_bytes()[-8192:].decode(errors="replace")
        except OSError as e:
            return f"(no console log: {e.strerror})"
        tail = text.splitlines()[-lines:]
        return "guest console, last lines:\n" + "\n".join(f"  {line}" for line in tail)

    async def start_restored(self, snapshot: SnapshotInfo, *, verify_memory: bool) -> None:
        """Launches a VMM and restores `snapshot` (a full one, or a diff on its base)."""
        if self._vmm is not None:
            raise SandboxError(f"sandbox {self.id} is already started")
        image = snapshot.path / SNAPSHOT_FILE
        try:
            saved = await anyio.to_thread.run_sync(_core.inspect_snapshot, image)
        except _core.SnapshotError as e:
            raise SandboxError(str(e)) from e
        await anyio.Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        try:
            self._drives = await self._clone_drives(snapshot.path, saved["drives"])
            options = RestoreOptions(
                snapshot=image,
                base=snapshot.base / SNAPSHOT_FILE if snapshot.base else None,
                serial=SerialFile(path=self.run_dir / "console.log"),
                clone_id=clone_id_of(self.id),
                verify_memory=verify_memory,
                drives=self._drives,
                vsock_uds_path=self.vsock_path if saved["vsock"] else None,
            )
            options, jail = self.confine_restore(options, saved["memory_mib"])
            self._jailed = jail is not None
            self._vmm = await VmmProcess.launch(self.workdir, jail=jail)
            _, report = await self._vmm.restore(options)
            self.restore_report = report
            if saved["vsock"]:
                # The restore reset every vsock connection: the agent is reached anew,
                # and reseeds the RNG state this clone shares with its siblings.
                await self._wait_for_agent()
                self.agent = await AgentClient.connect_hybrid_vsock(self.vsock_path, AGENT_PORT)
                await reseed_guest(self.agent, report.generation)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise
        self.restored_from = snapshot.base or snapshot.path

    async def _clone_drives(
        self, snapshot_dir: Path, saved: list[dict[str, Any]]
    ) -> list[DriveConfig]:
        """The snapshot's disks for this clone: its own copy of each scratch disk (the
        VMM adopts and wipes it), the shared read-only images as they are."""
        host_view = await _host_drives(snapshot_dir, len(saved))
        drives = []
        for i, raw in enumerate(saved):
            drive = codec.convert(raw, DriveConfig)
            if host_view is not None:
                drive = msgspec.structs.replace(drive, path=host_view[i].path)
            if drive.scratch is not None:
                copy = self.run_dir / drive_copy_name(i)
                await sparse_copy(snapshot_dir / drive_copy_name(i), copy)
                scratch = msgspec.structs.replace(drive.scratch, size_mib=None)
                drive = msgspec.structs.replace(drive, path=copy, scratch=scratch)
            elif not await anyio.Path(drive.path).exists():
                if drive.path == self.workdir / ROOT_IMAGE and self.spec.rootfs is not None:
                    # Its own root image, which went with the sandbox when it paused
                    # (Hypnos): made again from the same tree, byte for byte.
                    await self.root_image()
                    drives.append(drive)
                    continue
                raise SandboxError(
                    f"disk {drive.path} that the snapshot was taken with is gone; "
                    "rebuild the snapshot from its template"
                )
            drives.append(drive)
        return drives

    @property
    def lost(self) -> bool:
        if self._ending or self._agent is None:
            return False
        return self._vmm is not None and self._vmm.process.returncode is not None

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
            ended = report.exit
            state, detail = classify_exit(
                ended.reason if ended else "unknown",
                self._ending,
                ended.detail or ended.message if ended else None,
            )
            return SandboxStatus(id=self.id, backend=self.backend, state=state, detail=detail)
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

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        self._ending = True
        outcome = None
        if self._agent is not None:
            # The agent stops the guest's processes (SIGTERM, grace, SIGKILL) first.
            with contextlib.suppress(SandboxError):
                outcome = await self.shutdown_agent(grace_s)
            await self.close_agent()
        if self._vmm is not None:
            await self._vmm.stop(timeout_s=grace_s)
        await self._cleanup()
        return outcome

    async def kill(self) -> None:
        self._ending = True
        await self.close_agent()
        if self._vmm is not None:
            await self._vmm.kill()
        await self._cleanup()

    async def _cleanup(self) -> None:
        # The VMM wipes the scratch disk itself; this also covers a VMM that was killed.
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._template_owner is not None:
            from tartarus.images.store import TemplateStore  # noqa: PLC0415

            await TemplateStore(self.settings).release(self._template_owner)
            self._template_owner = None

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        """Pauses the guest, writes `vm.snap` (a diff against the snapshot this sandbox
        was restored from, while that is still there) and copies of the scratch disks
        into `dest_dir`, then lets the guest go on."""
        if self._vmm is None:
            raise SandboxError(f"sandbox {self.id} is not started")
        await anyio.Path(dest_dir).mkdir(parents=True, exist_ok=True)
        base = self.restored_from
        if base is not None and not await anyio.Path(base / SNAPSHOT_FILE).exists():
            base = None
        kind = SnapshotKind.DIFF if base else SnapshotKind.FULL
        was_running = (await self._vmm.state()).state is VmState.RUNNING
        # A jailed VMM writes into its run directory; the file is moved out after.
        written = (self.run_dir if self._jailed else dest_dir) / SNAPSHOT_FILE
        seen_as = Path(JAIL_RUN_DIR) / SNAPSHOT_FILE if self._jailed else written
        await self._vmm.pause()
        try:
            report = await self._vmm.snapshot(seen_as, kind)
            if self._jailed:
                await sparse_copy(written, dest_dir / SNAPSHOT_FILE)
                await anyio.Path(written).unlink()
            # The guest is paused, so its disks hold what its memory believes they do.
            size = report.file_bytes
            for i, drive in enumerate(self._drives):
                if drive.scratch is not None:
                    await sparse_copy(drive.path, dest_dir / drive_copy_name(i))
                    size += (await anyio.Path(drive.path).stat()).st_size
            await anyio.Path(dest_dir / DRIVES_FILE).write_bytes(codec.to_json(self._drives))
        finally:
            if was_running:
                await self._vmm.resume()
        return SnapshotInfo(
            backend=Backend.MICROVM,
            path=dest_dir,
            size_bytes=size,
            source_sandbox=self.id,
            base=base,
        )
