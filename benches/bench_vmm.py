"""VMM start-up, memory overhead and start rate: `tartarus-vmm` against QEMU's microvm.

Both boot the same probe guest (`hello`, whose first instructions write to COM1):
- start → first guest instruction: host wall time from spawning the process to the
  first serial byte, and the process's CPU time at that moment (sum of its threads'
  `schedstat` run time); ours also reports the CPU time it measured at its first exit;
- RSS overhead: the process's resident memory minus the guest RAM mapping;
- VMMs started per second with two at a time (this host has 2 cores).
As root it also measures ours in its jail (`--jail`: namespaces, pivot_root, cgroup,
uid drop); CPU time then adds the supervisor's to the jailed VMM's, RSS is the VMM's.
Firecracker's published bar: ≤ 5 MiB overhead, ≤ 8 CPU ms to start.

Run: `python -m benches.bench_vmm` (installs qemu-system-x86 with apt-get if missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.probe_guests import build_probe_guest

from benches.harness import Stats, report, write_result
from tartarus.binaries import find_binary
from tartarus.runtime.cgroups import remove_empty_cgroups

MEMORY_MIB = 64
RUNS = 30
RATE_VMS = 40


def ensure_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-system-x86"],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
        qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    return qemu


def cpu_ms(pid: int) -> float:
    """On-CPU time of every thread of `pid` so far, in ms (ns-resolution schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


def rss_overhead_kib(pid: int, guest_bytes: int) -> int:
    """Resident KiB of `pid` outside mappings at least as large as guest RAM."""
    total = 0
    size_kib = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size_kib = int(line.split()[1])
        elif line.startswith("Rss:") and size_kib * 1024 < guest_bytes:
            total += int(line.split()[1])
    return total


def ours_argv(guest: Path, workdir: Path) -> list[str]:
    config = {
        "memory_mib": MEMORY_MIB,
        "kernel": str(guest),
        "cmdline": "hello",
        "boot_protocol": "linux64",
        "serial": {"kind": "stdout"},
    }
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    return [str(find_binary("tartarus-vmm")), "run", "--config", str(path)]


JAIL_UID = 4_042_424
BENCH_CGROUP = f"tartarus-bench-{os.getpid()}"


def jailed_argv(guest: Path, workdir: Path) -> Callable[[], list[str]]:
    """A fresh `--jail` file (a cgroup name of its own) for every boot."""
    plain = ours_argv(guest, workdir)
    machine = json.loads((workdir / "config.json").read_text())
    machine["kernel"] = "/boot/vmlinux"
    (workdir / "jailed.json").write_text(json.dumps(machine))

    def argv() -> list[str]:
        jail = {
            "id": f"bench-{uuid.uuid4().hex[:12]}",
            "uid": JAIL_UID,
            "gid": JAIL_UID,
            "chroot_base": str(workdir / "chroot"),
            "mounts": [{"source": str(guest), "destination": "/boot/vmlinux"}],
            "cgroup": {"parent": BENCH_CGROUP},
        }
        path = workdir / f"{jail['id']}.json"
        path.write_text(json.dumps(jail))
        return [plain[0], "run", "--config", str(workdir / "jailed.json"), "--jail", str(path)]

    return argv


def qemu_argv(qemu: str, guest: Path) -> list[str]:
    return [
        qemu, "-accel", "kvm", "-M", "microvm", "-m", str(MEMORY_MIB), "-nodefaults",
        "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(guest), "-append", "hello",
    ]  # fmt: skip


class Boot:
    def __init__(self, wall_ms: float, cpu_ms: float, rss_kib: int, internal_cpu_ms: float | None):
        self.wall_ms = wall_ms
        self.cpu_ms = cpu_ms
        self.rss_kib = rss_kib
        self.internal_cpu_ms = internal_cpu_ms


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def boot_once(argv: list[str] | Callable[[], list[str]], *, kill: bool) -> Boot:
    """Spawns `argv`, waits for the first serial byte, samples it, then ends it. A
    jailed VMM is the child of the process spawned (its supervisor)."""
    argv = argv() if callable(argv) else argv
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    wall = (time.perf_counter() - started) * 1000
    vmm = ([proc.pid, *children(proc.pid)])[-1]
    cpu = sum(cpu_ms(p) for p in {proc.pid, vmm})
    rss = rss_overhead_kib(vmm, MEMORY_MIB << 20)
    assert first == b"h", f"{argv[0]} printed {first!r}"
    if kill:
        proc.kill()
    rest = proc.stdout.read()
    proc.wait(timeout=30)
    internal = None
    if not kill:
        metrics = json.loads(rest.splitlines()[-1])["metrics"]
        internal = metrics["first_exit_cpu_us"] / 1000
    return Boot(wall, cpu, rss, internal)


def rate(argv: list[str] | Callable[[], list[str]], *, kill: bool) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda _: boot_once(argv, kill=kill), range(RATE_VMS)))
    return RATE_VMS / (time.perf_counter() - started)


def summary(boots: list[Boot]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "start_to_first_instruction_wall": Stats.of([b.wall_ms / 1000 for b in boots]),
        "start_to_first_instruction_cpu": Stats.of([b.cpu_ms / 1000 for b in boots]),
        "rss_overhead_kib_p50": sorted(b.rss_kib for b in boots)[len(boots) // 2],
    }
    internal = [b.internal_cpu_ms for b in boots if b.internal_cpu_ms is not None]
    if internal:
        out["vmm_measured_cpu_at_first_exit"] = Stats.of([ms / 1000 for ms in internal])
    return out


def main() -> None:
    guest = build_probe_guest()
    qemu = ensure_qemu()
    with tempfile.TemporaryDirectory() as tmp:
        ours = ours_argv(guest, Path(tmp))
        peer = qemu_argv(qemu, guest)
        for argv, kill in ((ours, False), (peer, True)):
            boot_once(argv, kill=kill)  # warm the page cache
        our_boots = [boot_once(ours, kill=False) for _ in range(RUNS)]
        peer_boots = [boot_once(peer, kill=True) for _ in range(RUNS)]
        our_rate = rate(ours, kill=False)
        peer_rate = rate(peer, kill=True)
        jailed_s: dict[str, Any] | None = None
        if os.geteuid() == 0:
            jailed = jailed_argv(guest, Path(tmp))
            boot_once(jailed, kill=False)
            jailed_boots = [boot_once(jailed, kill=False) for _ in range(RUNS)]
            jailed_rate = rate(jailed, kill=False)
            remove_empty_cgroups(BENCH_CGROUP)
            jailed_s = {
                **summary(jailed_boots),
                "vmms_per_second_2_at_a_time": round(jailed_rate, 1),
            }
    ours_s = {**summary(our_boots), "vmms_per_second_2_at_a_time": round(our_rate, 1)}
    peer_s = {**summary(peer_boots), "vmms_per_second_2_at_a_time": round(peer_rate, 1)}
    results = {
        "guest": "probe.elf hello (64 MiB)",
        "tartarus_vmm": ours_s,
        "tartarus_vmm_jailed": jailed_s or "not measured (the jail needs root)",
        "qemu_microvm": peer_s,
        "firecracker_bar": {"rss_overhead_kib": 5 * 1024, "start_cpu_ms": 8},
    }
    report("start → first guest instruction (wall)", ours_s["start_to_first_instruction_wall"],
           peer_s["start_to_first_instruction_wall"], "qemu microvm")  # fmt: skip
    report("start → first guest instruction (CPU)", ours_s["start_to_first_instruction_cpu"],
           peer_s["start_to_first_instruction_cpu"], "qemu microvm")  # fmt: skip
    print(
        f"RSS overhead p50: ours {ours_s['rss_overhead_kib_p50']} KiB, "
        f"qemu {peer_s['rss_overhead_kib_p50']} KiB (bar 5120 KiB)"
    )
    print(f"VMMs/s with 2 at a time: ours {our_rate:.1f}, qemu {peer_rate:.1f}")
    if jailed_s is not None:
        report("jailed start → first guest instruction (wall)",
               jailed_s["start_to_first_instruction_wall"],
               ours_s["start_to_first_instruction_wall"], "ours unjailed")  # fmt: skip
        report("jailed start → first guest instruction (CPU)",
               jailed_s["start_to_first_instruction_cpu"],
               ours_s["start_to_first_instruction_cpu"], "ours unjailed")  # fmt: skip
        print(
            f"jailed: RSS overhead p50 {jailed_s['rss_overhead_kib_p50']} KiB, "
            f"{jailed_s['vmms_per_second_2_at_a_time']} VMMs/s with 2 at a time"
        )
    print(f"wrote {write_result('vmm', results)}")


if __name__ == "__main__":
    main()
