"""The microVM monitor in its own jail (`tartarus-vmm --jail`), on this host's KVM.

Every test here boots the probe guest in a real jail (namespaces, pivot_root into a
root of bind mounts, a cgroup, an unprivileged uid, seccomp) and inspects the jailed
process from the host through /proc: what its root holds, who it runs as, which
namespaces and cgroup it is in, and that nothing is left once it is gone. The jail
needs root; the path rewriting tests at the end do not.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tartarus import codec
from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.runtime.base import SandboxError
from tartarus.runtime.cgroups import cgroup_mounts, remove_empty_cgroups
from tartarus.runtime.microvm import (
    MicroVmRuntime,
    MicroVmSandbox,
    make_scratch_disk,
    wait_for_agent,
)
from tartarus.runtime.types import Resources, SandboxSpec
from tartarus.runtime.vmm_api import (
    BootProtocol,
    DriveConfig,
    MachineConfig,
    MemoryBacking,
    ScratchConfig,
    SerialFile,
    SerialSocket,
    VmmError,
    VmmProcess,
    VmState,
    VsockConfig,
    check_jail_access,
    give_to_jail,
    jail_machine,
)
from tartarus.runtime.vmm_jail import (
    BindMount,
    JailCgroup,
    JailConfig,
    JailMode,
    VmmJailSettings,
    jail_id,
)
from tests.conftest import require_root
from tests.guest_rootfs import busybox_rootfs
from tests.support.hugepages import free_huge_pages
from tests.support.probe_guests import build_probe_guest, seccomp_selftest, vmm_binary

pytestmark = pytest.mark.timeout(120)

UID = 4_042_424
NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "cgroup")


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_probe_guest()


@pytest.fixture(scope="module")
def vmm_bin(doctor_report: DoctorReport) -> str:
    require_root()
    return vmm_binary(doctor_report)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Jailed(msgspec.Struct):
    """A machine and the jail it runs in, on both sides of the jail's walls."""

    machine: MachineConfig  # paths inside the jail
    jail: JailConfig
    run_dir: Path  # the host side of the jail's /run


def jailed(
    guest: Path, tmp_path: Path, program: str, *, guest_memory_mib: int | None = None, **kw: Any
) -> Jailed:
    run_dir = tmp_path / "vm"
    run_dir.mkdir(exist_ok=True)
    host_machine = MachineConfig(
        memory_mib=kw.pop("memory_mib", 64),
        kernel=guest,
        cmdline=program,
        boot_protocol=BootProtocol.LINUX64,
        serial=SerialFile(path=run_dir / "serial.log"),
        wall_clock_limit_ms=60_000,
        **kw,
    )
    machine, mounts = jail_machine(host_machine, run_dir)
    jail = JailConfig(
        id=f"test-{uuid.uuid4().hex[:12]}",
        uid=UID,
        gid=UID,
        chroot_base=tmp_path / "chroot",
        mounts=mounts,
        cgroup=JailCgroup(parent=unique_cgroup_parent(), guest_memory_mib=guest_memory_mib),
    )
    give_to_jail(run_dir, jail)
    return Jailed(machine=machine, jail=jail, run_dir=run_dir)


def unique_cgroup_parent() -> str:
    """A parent cgroup of this test's own (one level: nothing shared to race over)."""
    return f"tartarus-test-{uuid.uuid4().hex[:12]}"


def write(path: Path, value: Any) -> Path:
    path.write_bytes(codec.to_json(value))
    return path


def run_jailed(vmm_bin: str, tmp_path: Path, j: Jailed) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            vmm_bin,
            "run",
            "--config",
            str(write(tmp_path / "machine.json", j.machine)),
            "--jail",
            str(write(tmp_path / "jail.json", j.jail)),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


# ---- what the host sees of a jailed process ----------------------------------------


def _cgroup_mounts() -> dict[str, Path]:
    """Controller (or "" for the unified hierarchy) -> mount point."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        mountpoint = Path(left.split()[4])
        fstype, _, superopts = right.split()[:3]
        if fstype == "cgroup2":
            found.setdefault("", mountpoint)
        elif fstype == "cgroup":
            for opt in superopts.split(","):
                found.setdefault(opt, mountpoint)
    return found


def cgroup_dirs(jail: JailConfig) -> list[Path]:
    """Every directory the jail's cgroup may have, one per hierarchy."""
    return [m / jail.cgroup.parent / jail.id for m in set(cgroup_mounts())]


def has_hugetlb() -> bool:
    """Whether this host's cgroups have the hugetlb controller (v1 mount or offered by v2)."""
    mounts = _cgroup_mounts()
    unified = mounts[""] / "cgroup.controllers" if "" in mounts else None
    return "hugetlb" in mounts or (unified is not None and "hugetlb" in unified.read_text().split())


def jail_cgroup_file(jail: JailConfig, controller: str, v1_name: str, v2_name: str) -> Path:
    """A file of `controller` in the jail's cgroup: in the controller's v1 hierarchy if
    the host mounts one, else in the unified hierarchy."""
    mounts = _cgroup_mounts()
    if controller in mounts:
        return mounts[controller] / jail.cgroup.parent / jail.id / v1_name
    return mounts[""] / jail.cgroup.parent / jail.id / v2_name


def memory_limit_file(jail: JailConfig) -> Path:
    return jail_cgroup_file(jail, "memory", "memory.limit_in_bytes", "memory.max")


def hugetlb_limit(jail: JailConfig) -> int:
    """The jail's cap on 2 MiB huge pages."""
    file = jail_cgroup_file(jail, "hugetlb", "hugetlb.2MB.limit_in_bytes", "hugetlb.2MB.max")
    return int(file.read_text())


def hugetlb_reserved(jail: JailConfig) -> int:
    """Bytes of 2 MiB huge pages reserved in the jail's name."""
    file = jail_cgroup_file(
        jail, "hugetlb", "hugetlb.2MB.rsvd.usage_in_bytes", "hugetlb.2MB.rsvd.current"
    )
    return int(file.read_text())


def pids_limit(jail: JailConfig) -> int:
    return int(jail_cgroup_file(jail, "pids", "pids.max", "pids.max").read_text())


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def jailed_vmm_pid(supervisor: int) -> int:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def assert_jailed(pid: int, j: Jailed) -> None:
    """What the host sees of the jailed VMM `pid` through /proc."""
    root = Path(f"/proc/{pid}/root")
    # Its root holds the kernel's mount point and its run directory, nothing else.
    assert sorted(p.name for p in root.iterdir()) == ["boot", "run"]
    assert [p.name for p in (root / "boot").iterdir()] == ["vmlinux"]
    assert not (root / "etc").exists()
    st = status(pid)
    assert st["Uid"].split() == [str(UID)] * 4
    assert st["Gid"].split() == [str(UID)] * 4
    assert st["Groups"] == str(UID)
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[caps], 16) == 0, caps
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode
    assert st["NSpid"].split() == [str(pid), "1"], "PID 1 of its own pid namespace"
    for ns in NAMESPACES:
        theirs, ours = Path(f"/proc/{pid}/ns/{ns}"), Path(f"/proc/self/ns/{ns}")
        assert theirs.readlink() != ours.readlink(), ns
    assert Path(f"/proc/{pid}/ns/user").readlink() == Path("/proc/self/ns/user").readlink()
    # A network namespace of its own: loopback only.
    devices = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    assert [d.split(":")[0].strip() for d in devices] == ["lo"]
    # In its cgroup, with the limits: guest RAM + overhead, pids.
    dirs = [d for d in cgroup_dirs(j.jail) if d.exists()]
    assert dirs, "no cgroup directory"
    for d in dirs:
        assert str(pid) in (d / "cgroup.procs").read_text().split()
    guest_mib = j.jail.cgroup.guest_memory_mib or j.machine.memory_mib
    assert (
        int(memory_limit_file(j.jail).read_text()) == (guest_mib + j.jail.cgroup.overhead_mib) << 20
    )
    assert pids_limit(j.jail) == j.jail.cgroup.pids
    # Guest RAM on huge pages is not charged to memory: hugetlb caps it at the guest's size.
    if has_hugetlb():
        assert hugetlb_limit(j.jail) == guest_mib << 20
    # No mount of the jail is visible on the host.
    assert str(j.jail.chroot_base) not in Path("/proc/self/mountinfo").read_text()


def assert_nothing_left(j: Jailed, pids: list[int]) -> None:
    for d in cgroup_dirs(j.jail):
        assert not d.exists(), f"cgroup {d} left behind"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} left behind"
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(j.jail.chroot_base) not in mounts
    assert not any(j.run_dir.glob("*.sock")), "sockets left behind"
    remove_empty_cgroups(j.jail.cgroup.parent)
    for mount in cgroup_mounts():
        assert not (mount / j.jail.cgroup.parent).exists()


# ---- tests --------------------------------------------------------------------------


def test_probe_guest_runs_in_the_jail(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    j = jailed(guest, tmp_path, "mem", memory_mib=96)
    proc = run_jailed(vmm_bin, tmp_path, j)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exit"] == {"reason": "reset"}
    top = 96 << 20
    serial = (j.run_dir / "serial.log").read_text()
    assert serial == f"mem: pages={(top - (2 << 20)) // 4096:016x} errors={0:016x} top={top:016x}\n"
    # The VMM created the log inside the jail, as its own uid.
    assert (j.run_dir / "serial.log").stat().st_uid == UID
    assert_nothing_left(j, [])


@pytest.mark.anyio
async def test_the_jailed_vmm_sees_only_its_chroot_as_nobody_in_its_own_namespaces(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    rounds = 16384 * 2000  # minutes of guest time: stopped long before the end
    j = jailed(guest, tmp_path, f"compute {rounds}", guest_memory_mib=64)
    vmm = await VmmProcess.launch(tmp_path / "api", jail=j.jail)
    supervisor = vmm.process.pid
    try:
        await vmm.configure(j.machine)
        await vmm.start()
        assert_jailed(jailed_vmm_pid(supervisor), j)
        assert (await vmm.state()).state is VmState.RUNNING
        final = await vmm.stop()
        assert final is not None and final.exit is not None
        assert final.exit.reason == "stopped"
        assert vmm.process.returncode == 0
    finally:
        await vmm.kill()
    assert_nothing_left(j, [supervisor])


@pytest.mark.parametrize("thread", ["api", "vcpu"])
def test_a_forbidden_system_call_kills_the_jailed_vmm(
    vmm_bin: str, guest: Path, tmp_path: Path, thread: str
) -> None:
    j = jailed(guest, tmp_path, "hello")
    proc = seccomp_selftest(vmm_bin, thread, "--jail", str(write(tmp_path / "j.json", j.jail)))
    # The supervisor reports the jailed VMM's death by SIGSYS as 128 + 31.
    assert proc.returncode == 128 + signal.SIGSYS, proc.stderr
    assert "killed by SIGSYS" in proc.stderr
    assert_nothing_left(j, [])


@pytest.mark.anyio
async def test_the_memory_limit_bites(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    # The VMM itself needs about a MiB beside guest RAM, so the default limit (guest RAM
    # + 64 MiB) never bites the probe; tighten it from the host before the guest runs.
    j = jailed(guest, tmp_path, "mem", memory_mib=96, guest_memory_mib=96)
    vmm = await VmmProcess.launch(tmp_path / "api", jail=j.jail)
    try:
        await vmm.configure(j.machine)
        memory_limit_file(j.jail).write_text(str(48 << 20))
        memsw = memory_limit_file(j.jail).with_name("memory.memsw.limit_in_bytes")
        if memsw.exists():  # v1 with swap accounting: memory+swap gets the same cap
            memsw.write_text(str(48 << 20))
        await vmm.start()
        with anyio.fail_after(60):
            await vmm.process.wait()
    finally:
        await vmm.kill()
    assert vmm.process.returncode == 128 + signal.SIGKILL
    assert "hit its memory limit" in vmm.stderr_tail()
    assert "errors=" not in (j.run_dir / "serial.log").read_text(), "killed mid-way"
    assert_nothing_left(j, [vmm.process.pid])


def test_the_pids_limit_bites_cleanly(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    j = jailed(guest, tmp_path, "hello", vcpus=4)
    j.jail = msgspec.structs.replace(j.jail, cgroup=msgspec.structs.replace(j.jail.cgroup, pids=2))
    proc = run_jailed(vmm_bin, tmp_path, j)
    assert proc.returncode == 3, proc.stderr  # could not start, never a crash
    assert "panicked" not in proc.stderr
    assert "Resource temporarily unavailable" in proc.stderr
    assert_nothing_left(j, [])


@pytest.mark.anyio
async def test_more_guest_ram_than_the_jail_allows_is_refused(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    j = jailed(guest, tmp_path, "hello", guest_memory_mib=32)
    vmm = await VmmProcess.launch(tmp_path / "api", jail=j.jail)
    try:
        with pytest.raises(VmmError) as e:
            await vmm.configure(j.machine)  # 64 MiB
        assert e.value.kind == "config"
        assert "at most 32 MiB" in str(e.value)
        smaller = msgspec.structs.replace(j.machine, memory_mib=32)
        assert (await vmm.configure(smaller)).state is VmState.CONFIGURED
    finally:
        await vmm.stop()
    # `run` refuses before building anything.
    proc = run_jailed(vmm_bin, tmp_path, j)
    assert proc.returncode == 3
    assert "jail allows 32 MiB" in proc.stderr
    assert_nothing_left(j, [vmm.process.pid])


def test_bad_jails_are_clear_errors_and_leave_nothing(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    j = jailed(guest, tmp_path, "hello")
    cases = {
        "uid and gid must be unprivileged": msgspec.structs.replace(j.jail, uid=0),
        "does not exist": msgspec.structs.replace(
            j.jail, mounts=[BindMount(source=tmp_path / "missing", destination="/k")]
        ),
        "must be 1-64 characters": msgspec.structs.replace(j.jail, id="../escape"),
    }
    for expected, jail in cases.items():
        proc = run_jailed(
            vmm_bin, tmp_path, Jailed(machine=j.machine, jail=jail, run_dir=j.run_dir)
        )
        assert proc.returncode == 3, proc.stderr
        assert expected in proc.stderr
        assert "panicked" not in proc.stderr
    # A file the jail cannot see: the kernel path was not rewritten.
    unbound = msgspec.structs.replace(j.machine, kernel=guest)
    proc = run_jailed(vmm_bin, tmp_path, Jailed(machine=unbound, jail=j.jail, run_dir=j.run_dir))
    assert proc.returncode == 3
    assert "kernel" in proc.stderr
    assert_nothing_left(j, [])


@pytest.mark.anyio
async def test_a_second_vmm_with_the_same_jail_id_is_refused(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    j = jailed(guest, tmp_path, "spin", guest_memory_mib=64)
    first = await VmmProcess.launch(tmp_path / "a", jail=j.jail)
    try:
        with pytest.raises(VmmError, match="File exists"):
            await VmmProcess.launch(tmp_path / "b", jail=j.jail, startup_timeout_s=5)
        assert (await first.state()).state is VmState.NOT_CONFIGURED
    finally:
        await first.stop()
    assert_nothing_left(j, [first.process.pid])


@pytest.mark.anyio
async def test_guest_ram_on_huge_pages_is_charged_to_the_jail(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    if not has_hugetlb():
        pytest.skip("this host's cgroups have no hugetlb controller")
    with free_huge_pages(16) as pages:
        guest_mib = 2 * pages
        j = jailed(
            guest,
            tmp_path,
            "spin",
            memory_mib=guest_mib,
            memory=MemoryBacking(hugepages=True),
            guest_memory_mib=guest_mib,
        )
        vmm = await VmmProcess.launch(tmp_path / "api", jail=j.jail)
        try:
            await vmm.configure(j.machine)
            await vmm.start()
            assert_jailed(jailed_vmm_pid(vmm.process.pid), j)
            # Reserved when mapped (no MAP_NORESERVE): the whole guest, in the jail's name.
            assert hugetlb_reserved(j.jail) == guest_mib << 20
        finally:
            await vmm.stop()
    assert_nothing_left(j, [vmm.process.pid])


@pytest.mark.anyio
async def test_killing_the_supervisor_tears_the_jail_down(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    j = jailed(guest, tmp_path, "spin", guest_memory_mib=64)
    vmm = await VmmProcess.launch(tmp_path / "api", jail=j.jail)
    await vmm.configure(j.machine)
    await vmm.start()
    pid = jailed_vmm_pid(vmm.process.pid)
    await vmm.kill()  # SIGTERM to the supervisor: SIGKILL for the jail, cgroup removed
    assert vmm.process.returncode == 128 + signal.SIGKILL
    assert_nothing_left(j, [pid, vmm.process.pid])


def test_the_jail_ends_when_its_starter_dies(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    """A crashed host process must not leave a VMM running that nobody can reach."""
    j = jailed(guest, tmp_path, "spin", guest_memory_mib=64)
    machine, jail = (
        write(tmp_path / "machine.json", j.machine),
        write(tmp_path / "jail.json", j.jail),
    )
    # The shell starts the jailed VMM in the background and exits, as a crashed server would.
    starter = subprocess.run(
        [
            "/bin/sh",
            "-c",
            '"$0" run --config "$1" --jail "$2" >/dev/null 2>&1 & echo $!; sleep 1',
            vmm_bin,
            str(machine),
            str(jail),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    supervisor = int(starter.stdout)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{supervisor}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_left(j, [supervisor])


@pytest.mark.anyio
async def test_backend_machine_runs_jailed_with_disks_and_vsock(
    vmm_bin: str, tmp_path: Path
) -> None:
    """The microvm backend's own machine (root image, Lethe scratch disk, vsock) through
    its own `confine`, with the virtio probe guest standing in for Linux."""
    settings = Settings(
        runtime_dir=tmp_path / "run",
        cache_dir=tmp_path / "cache",
        vmm_jail=VmmJailSettings(mode=JailMode.ALWAYS, cgroup_parent=unique_cgroup_parent()),
    )
    spec = SandboxSpec(
        id="jailed",
        rootfs=busybox_rootfs(tmp_path / "rootfs"),
        resources=Resources(memory_mib=32, disk_mib=16),
    )
    sb = MicroVmSandbox(spec, build_probe_guest("virtio_probe"), tmp_path / "sandbox", settings)
    sb.run_dir.mkdir(parents=True)
    root = await sb.root_image()
    scratch = await make_scratch_disk(sb.run_dir / "scratch.ext4", 16)
    host_machine = msgspec.structs.replace(
        sb.machine_config(root, scratch), cmdline="v", boot_protocol=BootProtocol.LINUX64
    )
    machine, jail = sb.confine(host_machine)
    assert jail is not None
    assert jail.uid == settings.vmm_jail.uid_for("jailed") != 0
    assert jail.cgroup.guest_memory_mib == 32
    assert scratch.stat().st_uid == jail.uid
    j = Jailed(machine=machine, jail=jail, run_dir=sb.run_dir)
    vmm = await VmmProcess.launch(sb.workdir, jail=jail)
    try:
        await vmm.configure(machine)
        await vmm.start()
        # The host reaches the guest through the socket the jailed VMM made in /run.
        await wait_for_agent(sb.vsock_path, timeout_s=60)
        assert sb.vsock_path.exists()
    finally:
        await vmm.stop()
    assert not scratch.exists(), "Lethe removed the scratch disk from inside the jail"
    assert_nothing_left(j, [vmm.process.pid])


# ---- path rewriting (no root needed) -----------------------------------------------


def test_jail_machine_binds_what_the_vmm_reads_and_keeps_what_it_writes_in_run(
    tmp_path: Path,
) -> None:
    run = tmp_path / "vm"
    machine = MachineConfig(
        memory_mib=64,
        kernel=tmp_path / "vmlinux",
        serial=SerialFile(path=run / "console.log"),
        memory=MemoryBacking(file=tmp_path / "snap" / "memory"),
        drives=[
            DriveConfig(path=tmp_path / "root.ext4", read_only=True),
            DriveConfig(path=run / "scratch.ext4", scratch=ScratchConfig()),
            DriveConfig(path=tmp_path / "data.img"),
        ],
        vsock=VsockConfig(guest_cid=3, uds_path=run / "vsock.sock"),
    )
    inside, mounts = jail_machine(machine, run)
    assert inside.kernel == Path("/boot/vmlinux")
    assert inside.serial == SerialFile(path=Path("/run/console.log"))
    assert inside.memory.file == Path("/boot/memory")
    assert [d.path for d in inside.drives] == [
        Path("/drives/0"),
        Path("/run/scratch.ext4"),
        Path("/drives/2"),
    ]
    assert inside.vsock is not None and inside.vsock.uds_path == Path("/run/vsock.sock")
    assert {(m.source, m.destination, m.readonly) for m in mounts} == {
        (run, "/run", False),
        (tmp_path / "vmlinux", "/boot/vmlinux", True),
        (tmp_path / "snap" / "memory", "/boot/memory", True),
        (tmp_path / "root.ext4", "/drives/0", True),
        (tmp_path / "data.img", "/drives/2", False),
    }
    # Only the kernel moved for a plain machine; a serial socket is bound writable.
    plain = MachineConfig(
        memory_mib=8, kernel=run / "k", serial=SerialSocket(path=tmp_path / "s.sock")
    )
    inside, mounts = jail_machine(plain, run)
    assert inside.kernel == Path("/run/k")
    assert inside.serial == SerialSocket(path=Path("/serial.sock"))
    assert [m.destination for m in mounts] == ["/run", "/serial.sock"]


@pytest.mark.parametrize("field", ["serial", "vsock", "scratch"])
def test_files_the_vmm_creates_must_be_in_its_run_dir(tmp_path: Path, field: str) -> None:
    elsewhere = tmp_path / "elsewhere" / "x"
    machine = MachineConfig(memory_mib=8, kernel=tmp_path / "k")
    if field == "serial":
        machine = msgspec.structs.replace(machine, serial=SerialFile(path=elsewhere))
    elif field == "vsock":
        machine = msgspec.structs.replace(
            machine, vsock=VsockConfig(guest_cid=3, uds_path=elsewhere)
        )
    else:
        drive = DriveConfig(path=elsewhere, scratch=ScratchConfig(size_mib=8))
        machine = msgspec.structs.replace(machine, drives=[drive])
    with pytest.raises(SandboxError, match="run directory"):
        jail_machine(machine, tmp_path / "vm")


def test_unreadable_files_are_refused_before_launch(tmp_path: Path) -> None:
    secret = tmp_path / "vmlinux"
    secret.write_bytes(b"k")
    secret.chmod(0o600)
    jail = JailConfig(
        id="x",
        uid=UID,
        gid=UID,
        chroot_base=tmp_path,
        mounts=[BindMount(source=secret, destination="/boot/vmlinux")],
    )
    with pytest.raises(SandboxError, match=f"not readable by the jailed VMM's uid {UID}"):
        check_jail_access(jail)
    secret.chmod(0o644)
    check_jail_access(jail)
    ro = tmp_path / "disk"
    ro.write_bytes(b"")
    ro.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IROTH)
    writable = msgspec.structs.replace(
        jail, mounts=[BindMount(source=ro, destination="/d", readonly=False)]
    )
    with pytest.raises(SandboxError, match="not writable"):
        check_jail_access(writable)


def test_jail_ids_are_cgroup_safe_and_unique_per_directory(tmp_path: Path) -> None:
    a = jail_id("my sandbox/../x", tmp_path / "a")
    b = jail_id("my sandbox/../x", tmp_path / "b")
    assert a != b
    assert all(c.isalnum() or c in "._-" for c in a)
    assert len(a) <= 64
    settings = VmmJailSettings(uid_base=100_000, uid_count=10)
    assert {settings.uid_for(f"sb-{i}") for i in range(100)} <= set(range(100_000, 100_010))
    assert settings.uid_for("a") == settings.uid_for("a")
    assert VmmJailSettings(mode=JailMode.NEVER).enabled() is False
    assert VmmJailSettings(mode=JailMode.AUTO).enabled() is (os.geteuid() == 0)


def test_settings_accept_a_vmm_jail_section(tmp_path: Path) -> None:
    raw = {"vmm_jail": {"mode": "never", "uid_base": 200_000, "overhead_mib": 96}}
    settings = msgspec.convert(raw, Settings, dec_hook=codec.dec_hook)
    assert settings.vmm_jail.mode is JailMode.NEVER
    assert settings.vmm_jail.overhead_mib == 96
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"vmm_jail": {"overhead_mib": 1}}, Settings, dec_hook=codec.dec_hook)


@pytest.mark.anyio
async def test_reap_tears_down_a_leftover_jailed_vmm(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    settings = Settings(runtime_dir=tmp_path / "run")
    runtime = MicroVmRuntime(settings=settings)
    j = jailed(guest, tmp_path, "spin", guest_memory_mib=64)
    left = await VmmProcess.launch(runtime.sandboxes_dir / "leftover", jail=j.jail)
    try:
        await left.configure(j.machine)
        await left.start()
        pid = jailed_vmm_pid(left.process.pid)
        assert await runtime.reap(set()) == ["leftover"]
        with anyio.fail_after(10):
            await left.process.wait()
        # SIGTERM reached the supervisor, which killed the jail and removed its cgroup.
        assert left.process.returncode == 128 + signal.SIGKILL
    finally:
        await left.kill()
    assert_nothing_left(j, [pid, left.process.pid])
