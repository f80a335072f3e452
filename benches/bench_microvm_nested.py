"""Linux microVMs under nested KVM: `tartarus-vmm` against Firecracker (and QEMU microvm).

This host's /dev/kvm cannot run a Linux guest, so the bench boots one nested-KVM L1
(tests/support/nested_kvm.py: QEMU TCG with emulated SVM) and runs a driver inside it
(`--driver`). The driver takes turns, N times (`TARTARUS_BENCH_NESTED_RUNS`, default 3):
- tartarus-vmm: spawn → configure → start → the agent answers hello over vsock; the
  monitor's RSS then; pause + full snapshot; a new process restores it (memory not
  re-verified, as for a snapshot the runtime has checked once) → the agent answers hello;
- Firecracker, the same through its API socket (PUT /boot-source, /drives, /machine-config,
  /vsock, /actions InstanceStart; PATCH /vm Paused, PUT /snapshot/create; a new process
  PUT /snapshot/load with resume_vm);
- QEMU `-M microvm` (-accel kvm): L1's kernel has no vhost-vsock, so QEMU cannot reach the
  agent; its endpoint is the agent reaching its listen step instead (a unix listen that
  fails on purpose prints a line on the serial console), slightly earlier than a hello.
All boot the cached guest kernel with the runtime's command line (`guest_cmdline()`),
the `base` template's ext4 image read-only as vda, a fresh 256 MiB ext4 scratch disk as
vdb, 256 MiB of RAM and 1 vCPU, all unjailed. L1's own boot is not
counted. Firecracker is found at $TARTARUS_FIRECRACKER, on PATH, or under
~/.cache/tartarus/peers/firecracker/<version>/ (benches/peers/build-firecracker.sh builds
it); without it the bench says so and measures the others.

Run: `python -m benches.bench_microvm_nested` (needs the L1 image `make artefacts`
prepares; 4-10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import msgspec

from benches.harness import Stats, write_result
from tartarus.binaries import find_binary
from tartarus.config import load_settings
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient
from tartarus.runtime.microvm import (
    AGENT_PORT,
    GUEST_CID,
    guest_cmdline,
    make_scratch_disk,
    newest_kernel,
    sparse_copy,
    wait_for_agent,
)
from tartarus.runtime.vmm_api import (
    DriveConfig,
    MachineConfig,
    RestoreOptions,
    ScratchConfig,
    SerialFile,
    SnapshotKind,
    VmmProcess,
    VsockConfig,
)

ROOT = Path(__file__).resolve().parent.parent
RUNS = int(os.environ.get("TARTARUS_BENCH_NESTED_RUNS", "3"))
MEMORY_MIB = 256
VCPUS = 1
SCRATCH_MIB = 256
CMDLINE = guest_cmdline()
# QEMU's guest agent listens where it cannot: the error line is the readiness marker.
# QEMU would append its virtio-mmio devices after the `--` (they would reach the agent,
# not the kernel): they are named here, in microvm's layout (the first -device gets the
# highest transport), before the agent's arguments.
QEMU_DEVICES = "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11"
QEMU_CMDLINE = CMDLINE.replace(" -- ", f" {QEMU_DEVICES} -- ").replace(
    f"vsock:{AGENT_PORT}", "unix:/nonexistent/agent.sock"
)
QEMU_MARKER = b"tartarus-agent: "
# Guests take tens of seconds to boot under nested emulation.
AGENT_TIMEOUT_S = float(os.environ.get("TARTARUS_BENCH_NESTED_AGENT_TIMEOUT_S", "300"))
# `/bin/true` execs timed per boot; their median is the exec round trip.
EXEC_ROUND_TRIPS = 10
L1_TIMEOUT_S = float(os.environ.get("TARTARUS_BENCH_NESTED_TIMEOUT_S", "2400"))
# Clone density: this many clones of one snapshot restored at once, in each run.
CLONES = int(os.environ.get("TARTARUS_BENCH_NESTED_CLONES", "4"))
FIRECRACKER_CACHE = Path.home() / ".cache" / "tartarus" / "peers" / "firecracker"


class Params(msgspec.Struct, frozen=True):
    runs: int
    kernel: str
    rootfs: str
    out: str
    firecracker: str | None
    qemu: str | None


class Sample(msgspec.Struct):
    """One boot (and snapshot round trip) of one monitor; times in seconds."""

    boot_s: float | None = None
    rss_kib: int | None = None
    hwm_kib: int | None = None
    snapshot_create_s: float | None = None
    restore_s: float | None = None
    restore_rss_kib: int | None = None
    # Median of EXEC_ROUND_TRIPS `/bin/true` execs through the agent once booted.
    exec_s: float | None = None
    # The monitor's CPU time (all threads, user + system) at the agent's hello.
    cpu_s: float | None = None
    # The same per thread (by name), to see where it went.
    thread_cpu_s: dict[str, float] | None = None
    # RSS outside the guest RAM mapping (the monitor's own memory).
    overhead_kib: int | None = None
    # Ours only: the VMM's exit counters at the agent's hello.
    vmm_metrics: dict[str, Any] | None = None
    # Clone density: CLONES restores of the snapshot started together → the last hello;
    # then each clone's proportional set size (shared snapshot pages split between them).
    clones_ready_s: float | None = None
    clone_pss_kib: int | None = None
    error: str | None = None


class DriverResult(msgspec.Struct):
    tartarus: list[Sample] = msgspec.field(default_factory=list)
    firecracker: list[Sample] = msgspec.field(default_factory=list)
    qemu: list[Sample] = msgspec.field(default_factory=list)
    l1_kernel: str = ""


class BenchError(RuntimeError):
    pass


# ---- inside L1 ----


def proc_kib(pid: int, field: str) -> int | None:
    """A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """utime + stime of every thread of `pid` so far, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """utime + stime per thread of `pid`, keyed `name/tid`, in seconds."""
    threads = {}
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            head, _, rest = (task / "stat").read_text().rpartition(")")
            fields = rest.split()
            name = head.partition("(")[2]
            ticks = int(fields[11]) + int(fields[12])
            threads[f"{name}/{task.name}"] = ticks / os.sysconf("SC_CLK_TCK")
    return threads


def overhead_kib(pid: int) -> int | None:
    """Resident KiB of every mapping but the guest's RAM (the one at least MEMORY_MIB big)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    total, size = 0, 0
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "Size":
            size = int(value.split()[0])
        elif name == "Rss" and size < MEMORY_MIB * 1024:
            total += int(value.split()[0])
    return total


def pss_kib(pid: int) -> int | None:
    """The process's proportional set size: pages it shares count split among sharers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def mean_pss_kib(pids: list[int]) -> int | None:
    values = [v for pid in pids if (v := pss_kib(pid)) is not None]
    return sum(values) // len(values) if values else None


async def agent_hello(uds: Path) -> None:
    """Returns once the guest's agent has answered hello through the hybrid vsock socket."""
    await wait_for_agent(uds, timeout_s=AGENT_TIMEOUT_S)
    client = await AgentClient.connect_hybrid_vsock(uds, AGENT_PORT)
    await client.aclose()


async def exec_round_trip_s(uds: Path) -> float:
    """Median time of `/bin/true` through the booted guest's agent: the exec request out
    over vsock, the process run, its exit back (one connection, as the runtime keeps)."""
    client = await AgentClient.connect_hybrid_vsock(uds, AGENT_PORT)
    times = []
    try:
        for _ in range(EXEC_ROUND_TRIPS):
            started = time.perf_counter()
            stream = await client.start(p.Exec(argv=["/bin/true"]))
            while not isinstance(await stream.next(timeout_s=30), p.Exit):
                pass
            stream.close()
            times.append(time.perf_counter() - started)
    finally:
        await client.aclose()
    return statistics.median(times)


async def run_tartarus(params: Params, work: Path) -> Sample:
    sample = Sample()
    run_dir = work / "vm"
    run_dir.mkdir(parents=True)
    scratch = await make_scratch_disk(run_dir / "scratch.ext4", SCRATCH_MIB)
    root = DriveConfig(path=Path(params.rootfs), read_only=True, id="tartarus-root")
    uds = run_dir / "vsock.sock"
    machine = MachineConfig(
        vcpus=VCPUS,
        memory_mib=MEMORY_MIB,
        kernel=Path(params.kernel),
        cmdline=CMDLINE,
        serial=SerialFile(path=run_dir / "console.log"),
        drives=[root, DriveConfig(path=scratch, id="tartarus-scratch", scratch=ScratchConfig())],
        vsock=VsockConfig(guest_cid=GUEST_CID, uds_path=uds),
    )
    snap_dir = work / "snap"
    snap_dir.mkdir()
    started = time.perf_counter()
    vmm = await VmmProcess.launch(work)
    try:
        await vmm.configure(machine)
        await vmm.start()
        await agent_hello(uds)
        sample.boot_s = time.perf_counter() - started
        sample.rss_kib = proc_kib(vmm.process.pid, "VmRSS")
        sample.hwm_kib = proc_kib(vmm.process.pid, "VmHWM")
        sample.overhead_kib = overhead_kib(vmm.process.pid)
        sample.cpu_s = cpu_s(vmm.process.pid)
        sample.thread_cpu_s = thread_cpu_s(vmm.process.pid)
        sample.vmm_metrics = msgspec.to_builtins(await vmm.metrics())
        sample.exec_s = await exec_round_trip_s(uds)
        started = time.perf_counter()
        await vmm.pause()
        await vmm.snapshot(snap_dir / "vm.snap", SnapshotKind.FULL)
        sample.snapshot_create_s = time.perf_counter() - started
        # The paused guest's scratch disk, as the runtime copies it (not timed).
        await sparse_copy(scratch, snap_dir / "drive1.img")
    finally:
        await vmm.kill()
    started = time.perf_counter()
    restored, clone_uds = await restore_tartarus(snap_dir, root, work / "clone", clone_id=1)
    try:
        await agent_hello(clone_uds)
        sample.restore_s = time.perf_counter() - started
        sample.restore_rss_kib = proc_kib(restored.process.pid, "VmRSS")
    finally:
        await restored.kill()
    await tartarus_clones(snap_dir, root, work, sample)
    return sample


async def measure_clones(
    sample: Sample,
    one: Callable[[int], Coroutine[Any, Any, None]],
    pids: Callable[[], list[int]],
) -> None:
    """Starts CLONES restores (`one(i)`) together; records the time to the last hello
    and the clones' mean PSS then."""
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(CLONES):
            tg.start_soon(one, i)
    sample.clones_ready_s = time.perf_counter() - started
    sample.clone_pss_kib = mean_pss_kib(pids())


async def tartarus_clones(snap_dir: Path, root: DriveConfig, work: Path, sample: Sample) -> None:
    """CLONES new VMMs restore the snapshot at once, each with its own clone id."""
    clones: list[VmmProcess] = []

    async def one(i: int) -> None:
        vmm, uds = await restore_tartarus(snap_dir, root, work / f"clone{i}", clone_id=2 + i)
        clones.append(vmm)
        await agent_hello(uds)

    try:
        await measure_clones(sample, one, lambda: [c.process.pid for c in clones])
    finally:
        for vmm in clones:
            await vmm.kill()


async def restore_tartarus(
    snap_dir: Path, root: DriveConfig, clone: Path, clone_id: int
) -> tuple[VmmProcess, Path]:
    """A new VMM restoring the snapshot in `snap_dir` with its own copy of the scratch disk;
    returns it (restored and running) and its vsock socket."""
    clone_run = clone / "vm"
    clone_run.mkdir(parents=True)
    await sparse_copy(snap_dir / "drive1.img", clone_run / "drive1.img")
    clone_uds = clone_run / "vsock.sock"
    options = RestoreOptions(
        snapshot=snap_dir / "vm.snap",
        serial=SerialFile(path=clone_run / "console.log"),
        drives=[
            root,
            DriveConfig(
                path=clone_run / "drive1.img", id="tartarus-scratch", scratch=ScratchConfig()
            ),
        ],
        vsock_uds_path=clone_uds,
        clone_id=clone_id,
        verify_memory=False,
    )
    vmm = await VmmProcess.launch(clone)
    try:
        await vmm.restore(options)
    except BaseException:
        await vmm.kill()
        raise
    return vmm, clone_uds


def http(sock: Path, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """One request to Firecracker's API socket; raises unless it answers 2xx."""
    data = msgspec.json.encode(body) if body is not None else b""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(sock))
        s.sendall(head.encode() + data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        header, _, rest = reply.partition(b"\r\n\r\n")
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    status = int(header.split(b" ", 2)[1]) if header.startswith(b"HTTP/") else 0
    if not 200 <= status < 300:
        raise BenchError(f"firecracker {method} {path}: {status} {rest.decode(errors='replace')}")


def spawn_firecracker(
    binary: str, api: Path, log: Path, prefix: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts Firecracker (after `prefix`, a command that execs it) and returns once its
    API socket accepts connections."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*(prefix or []), binary, "--api-sock", str(api)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, contextlib.suppress(OSError):
            s.connect(str(api))
            return proc
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    tail = log.read_bytes()[-2000:].decode(errors="replace")
    raise BenchError(f"firecracker did not open {api} (exit {proc.returncode}): {tail}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


async def run_firecracker(params: Params, work: Path) -> Sample:
    assert params.firecracker is not None
    sample = Sample()
    run_dir = work / "vm"
    run_dir.mkdir(parents=True)
    scratch = await make_scratch_disk(run_dir / "scratch.ext4", SCRATCH_MIB)
    api, uds, log = run_dir / "api.sock", run_dir / "vsock.sock", run_dir / "console.log"
    snap, mem = work / "vm.snap", work / "vm.mem"
    started = time.perf_counter()
    proc = spawn_firecracker(params.firecracker, api, log)
    try:
        http(api, "PUT", "/boot-source", {"kernel_image_path": params.kernel, "boot_args": CMDLINE})
        for drive_id, path, read_only in (("root", params.rootfs, True),
                                          ("scratch", str(scratch), False)):  # fmt: skip
            http(api, "PUT", f"/drives/{drive_id}", {
                "drive_id": drive_id, "path_on_host": path,
                "is_root_device": False, "is_read_only": read_only,
            })  # fmt: skip
        http(api, "PUT", "/machine-config", {"vcpu_count": VCPUS, "mem_size_mib": MEMORY_MIB})
        http(api, "PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": str(uds)})
        http(api, "PUT", "/actions", {"action_type": "InstanceStart"})
        await agent_hello(uds)
        sample.boot_s = time.perf_counter() - started
        sample.rss_kib = proc_kib(proc.pid, "VmRSS")
        sample.hwm_kib = proc_kib(proc.pid, "VmHWM")
        sample.overhead_kib = overhead_kib(proc.pid)
        sample.cpu_s = cpu_s(proc.pid)
        sample.thread_cpu_s = thread_cpu_s(proc.pid)
        sample.exec_s = await exec_round_trip_s(uds)
        started = time.perf_counter()
        http(api, "PATCH", "/vm", {"state": "Paused"})
        http(api, "PUT", "/snapshot/create", {
            "snapshot_type": "Full", "snapshot_path": str(snap), "mem_file_path": str(mem),
        })  # fmt: skip
        sample.snapshot_create_s = time.perf_counter() - started
    finally:
        stop(proc)
    # The snapshot names the scratch disk and the vsock socket: the clone reuses both.
    for leftover in (api, uds):
        leftover.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = spawn_firecracker(params.firecracker, api, log)
    try:
        load_snapshot(api, snap, mem)
        await agent_hello(uds)
        sample.restore_s = time.perf_counter() - started
        sample.restore_rss_kib = proc_kib(proc.pid, "VmRSS")
    finally:
        stop(proc)
    await firecracker_clones(params.firecracker, (snap, mem), scratch, work, sample)
    return sample


async def firecracker_clones(
    binary: str, snapshot: tuple[Path, Path], scratch: Path, work: Path, sample: Sample
) -> None:
    """CLONES Firecrackers load the snapshot at once. A Firecracker snapshot names its
    disks' and vsock's paths, so each clone runs in its own mount namespace with its own
    directory mounted over the run directory, as the jailer's chroot gives each one."""
    clones: list[subprocess.Popen[bytes]] = []

    async def one(i: int) -> None:
        own = work / f"clone{i}"
        own.mkdir()
        await sparse_copy(scratch, own / scratch.name)
        over = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"',
                "sh", str(own), str(scratch.parent)]  # fmt: skip
        api = own / "api.sock"
        proc = await anyio.to_thread.run_sync(
            lambda: spawn_firecracker(binary, api, own / "fc.log", over)
        )
        clones.append(proc)
        await anyio.to_thread.run_sync(load_snapshot, api, *snapshot)
        await agent_hello(own / "vsock.sock")

    try:
        await measure_clones(sample, one, lambda: [c.pid for c in clones])
    finally:
        for proc in clones:
            stop(proc)


def load_snapshot(api: Path, snap: Path, mem: Path) -> None:
    http(api, "PUT", "/snapshot/load", {
        "snapshot_path": str(snap),
        "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
        "resume_vm": True,
    })  # fmt: skip


def spawn_qemu(argv: list[str], log: Path, stderr: Path) -> subprocess.Popen[bytes]:
    log.touch()
    with stderr.open("wb") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )


async def run_qemu(params: Params, work: Path) -> Sample:
    assert params.qemu is not None
    sample = Sample()
    scratch = await make_scratch_disk(work / "scratch.ext4", SCRATCH_MIB)
    log = work / "console.log"
    argv = [
        params.qemu, "-M", "microvm,acpi=off,auto-kernel-cmdline=off",
        "-accel", "kvm", "-cpu", "host",
        "-m", str(MEMORY_MIB), "-smp", str(VCPUS),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{log}",
        "-kernel", params.kernel, "-append", QEMU_CMDLINE,
        "-drive", f"id=root,file={params.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-drive", f"id=scratch,file={scratch},format=raw,if=none",
        "-device", "virtio-blk-device,drive=scratch",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = spawn_qemu(argv, log, work / "qemu.stderr")
    try:
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        while QEMU_MARKER not in (text := log.read_bytes()):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = (work / "qemu.stderr").read_bytes()[-500:].decode(errors="replace")
                raise BenchError(
                    f"qemu ended or timed out (exit {proc.returncode}) before the agent's line: "
                    f"{err} console: {text[-1500:].decode(errors='replace')}"
                )
            await anyio.sleep(0.02)
        sample.boot_s = time.perf_counter() - started
        sample.rss_kib = proc_kib(proc.pid, "VmRSS")
        sample.hwm_kib = proc_kib(proc.pid, "VmHWM")
        sample.overhead_kib = overhead_kib(proc.pid)
        sample.cpu_s = cpu_s(proc.pid)
        sample.thread_cpu_s = thread_cpu_s(proc.pid)
        # The whole line: the marker may be read before the rest of it is written.
        while b"\n" not in text[text.index(QEMU_MARKER) :] and proc.poll() is None:
            await anyio.sleep(0.01)
            text = log.read_bytes()
        line = text[text.index(QEMU_MARKER) :].split(b"\n", 1)[0].decode(errors="replace")
        if "cannot listen" not in line:
            raise BenchError(f"the agent printed {line!r} instead of its listen error")
    finally:
        stop(proc)
    return sample


def warm(paths: list[str | None]) -> None:
    """Reads the files once: they come over 9p, and the first boot would pay for it."""
    for path in paths:
        if path:
            with Path(path).open("rb") as f:
                while f.read(1 << 20):
                    pass


def consoles(work: Path) -> str:
    """The ends of the guest consoles and monitor logs under `work`, for an error."""
    parts = []
    for log in sorted(work.rglob("*")):
        if log.suffix in (".log", ".stderr") and log.is_file():
            tail = log.read_bytes()[-1500:].decode(errors="replace")
            parts.append(f"\n--- {log.relative_to(work)}:\n{tail}")
    return "".join(parts)


async def driver(params: Params) -> None:
    out = Path(params.out)
    result = DriverResult(l1_kernel=os.uname().release)
    warm([params.kernel, params.rootfs, params.firecracker, params.qemu,
          str(find_binary("tartarus-vmm"))])  # fmt: skip
    kinds: list[tuple[str, list[Sample], Callable[[Params, Path], Any]]] = [
        ("tartarus", result.tartarus, run_tartarus)
    ]
    if params.firecracker:
        kinds.append(("firecracker", result.firecracker, run_firecracker))
    if params.qemu:
        kinds.append(("qemu", result.qemu, run_qemu))
    for i in range(params.runs):
        for name, samples, fn in kinds:
            work = Path(tempfile.mkdtemp(prefix=f"{name}-{i}-", dir="/tmp"))
            try:
                sample = await fn(params, work)
            except Exception as e:  # recorded; the run goes on
                sample = Sample(error=f"{type(e).__name__}: {e}"[-1500:] + consoles(work))
            shutil.rmtree(work, ignore_errors=True)
            samples.append(sample)
            print(f"=== bench run {i} {name}: {msgspec.json.encode(sample).decode()}", flush=True)
            write_partial(out / "driver.json", result)


def write_partial(path: Path, result: DriverResult) -> None:
    """Written after every sample, so an L1 that runs out of time still reports."""
    path.write_bytes(msgspec.json.encode(result))


# ---- on the host ----


def find_firecracker() -> Path | None:
    """$TARTARUS_FIRECRACKER, else `firecracker` on PATH, else the newest cached build."""
    if override := os.environ.get("TARTARUS_FIRECRACKER"):
        return Path(override) if Path(override).is_file() else None
    if found := shutil.which("firecracker"):
        return Path(found)
    cached = sorted(FIRECRACKER_CACHE.glob("*/firecracker"), key=lambda p: p.stat().st_mtime)
    return cached[-1] if cached else None


def version_of(binary: Path) -> str:
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    return (result.stdout.strip().splitlines() or ["unknown"])[0]


def stats(samples: list[Sample], field: str) -> Stats | None:
    values = [getattr(s, field) for s in samples if getattr(s, field) is not None]
    return Stats.of(values) if values else None


def kib_median(samples: list[Sample], field: str) -> int | None:
    values = sorted(getattr(s, field) for s in samples if getattr(s, field) is not None)
    return values[len(values) // 2] if values else None


def summary(samples: list[Sample]) -> dict[str, Any]:
    return {
        "runs": samples,
        "boot_to_agent": stats(samples, "boot_s"),
        "boot_cpu": stats(samples, "cpu_s"),
        "snapshot_create": stats(samples, "snapshot_create_s"),
        "restore_to_agent": stats(samples, "restore_s"),
        "exec_round_trip": stats(samples, "exec_s"),
        "rss_kib_p50": kib_median(samples, "rss_kib"),
        "hwm_kib_p50": kib_median(samples, "hwm_kib"),
        "overhead_kib_p50": kib_median(samples, "overhead_kib"),
        "restore_rss_kib_p50": kib_median(samples, "restore_rss_kib"),
        f"{CLONES}_clones_to_agent": stats(samples, "clones_ready_s"),
        "clone_pss_kib_p50": kib_median(samples, "clone_pss_kib"),
        "errors": [s.error for s in samples if s.error],
    }


def ratio_of(ours: Any, peer: Any) -> float | None:
    if isinstance(ours, Stats) and isinstance(peer, Stats) and peer.p50_ms:
        return round(ours.p50_ms / peer.p50_ms, 3)
    if isinstance(ours, int) and isinstance(peer, int) and peer:
        return round(ours / peer, 3)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver", type=Path, help="(inside L1) run the driver on PARAMS")
    args = parser.parse_args()
    if args.driver:
        anyio.run(driver, msgspec.json.decode(args.driver.read_bytes(), type=Params))
        return 0

    from tests.support import nested_kvm  # noqa: PLC0415 - the host side only

    if reason := nested_kvm.qemu_available():
        print(f"microvm_nested: skipped: {reason}")
        return 0
    image = nested_kvm.cached_image()
    if image is None:
        print("microvm_nested: skipped: no L1 image (`make artefacts` prepares it)")
        return 0
    settings = load_settings()
    kernel = newest_kernel(settings)
    if kernel is None:
        print("microvm_nested: skipped: no guest kernel (`tartarus kernel build`)")
        return 0
    from tartarus.images.store import TemplateStore  # noqa: PLC0415 - heavy

    async def base_ext4() -> Path | None:
        return (await TemplateStore(settings).resolve("base", ext4=True)).ext4

    rootfs = anyio.run(base_ext4)
    assert rootfs is not None
    firecracker = find_firecracker()
    fc_version = version_of(firecracker) if firecracker else None
    if firecracker is None:
        print(
            "microvm_nested: no Firecracker binary ($TARTARUS_FIRECRACKER, PATH, "
            f"{FIRECRACKER_CACHE}/<version>/firecracker; benches/peers/build-firecracker.sh "
            "builds one): measuring tartarus-vmm and QEMU only"
        )
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory(prefix="bench-nested-") as tmp:
        out = Path(tmp)
        params = Params(
            runs=RUNS,
            kernel=str(kernel),
            rootfs=str(rootfs),
            out=str(out),
            firecracker=str(firecracker) if firecracker else None,
            qemu=qemu,
        )
        (out / "params.json").write_bytes(msgspec.json.encode(params))
        job = (
            f"cd {ROOT} && {sys.executable} -m benches.bench_microvm_nested "
            f"--driver {out / 'params.json'}"
        )
        run = nested_kvm.boot(
            image, job, out, timeout_s=L1_TIMEOUT_S,
            on_line=lambda line: print(line) if "=== " in line else None,
        )  # fmt: skip
        raw = (out / "driver.json").read_bytes() if (out / "driver.json").exists() else None
        if raw is None:
            print("\n".join(run.console.splitlines()[-60:]))
            print(f"microvm_nested: the driver wrote nothing (L1 job exit {run.exit_code})")
            return 1
        result = msgspec.json.decode(raw, type=DriverResult)
    ours, fc, qm = summary(result.tartarus), summary(result.firecracker), summary(result.qemu)
    keys = ("boot_to_agent", "boot_cpu", "exec_round_trip", "snapshot_create",
            "restore_to_agent", "rss_kib_p50", "hwm_kib_p50", "overhead_kib_p50",
            "restore_rss_kib_p50", f"{CLONES}_clones_to_agent",
            "clone_pss_kib_p50")  # fmt: skip
    results: dict[str, Any] = {
        "setup": (
            f"inside a nested-KVM L1 ({result.l1_kernel} under QEMU TCG -cpu max,+svm, "
            f"{nested_kvm.L1_CPUS} vCPUs) on this host; L1 boot ({run.seconds:.0f} s for the "
            "whole L1 run) not counted. Guest: cached vmlinux, `base` ext4 read-only + 256 MiB "
            "scratch, 256 MiB RAM, 1 vCPU, unjailed monitors. Times: process spawn → agent "
            "hello over vsock (QEMU: → agent's listen step on the serial console); snapshot: "
            "pause + full snapshot; exec: median of 10 `/bin/true` through the agent; "
            "restore: spawn → restored agent's hello (ours without "
            f"memory re-verification); clones: {CLONES} restores of one snapshot started "
            "together → the last hello, and each clone's mean PSS then (Firecracker's "
            "clones each in its own mount namespace, as its jailer gives them)"
        ),
        "runs": RUNS,
        "kernel": str(kernel),
        "firecracker_version": fc_version or "absent",
        "tartarus_vmm": ours,
        "firecracker": fc if firecracker else "absent: no binary found",
        "qemu_microvm": qm if qemu else "absent: qemu-system-x86_64 not on PATH",
        "ratio_tartarus_over_firecracker": {k: ratio_of(ours[k], fc[k]) for k in keys},
        "ratio_tartarus_over_qemu_boot": ratio_of(ours["boot_to_agent"], qm["boot_to_agent"]),
    }
    for name, part in (("tartarus-vmm", ours), ("firecracker", fc), ("qemu microvm", qm)):
        cells = [
            f"{k} p50 {s.p50_ms / 1000:.2f} s" if isinstance(s, Stats) else f"{k} {s}"
            for k in keys
            if (s := part[k]) is not None
        ]
        errors = f" errors: {part['errors']}" if part["errors"] else ""
        print(f"{name}: " + ", ".join(cells) + errors)
    print(f"ratios tartarus/firecracker: {results['ratio_tartarus_over_firecracker']}")
    print(f"wrote {write_result('microvm_nested', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
