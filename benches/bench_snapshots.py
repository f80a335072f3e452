"""Snapshots (Nyx): restore latency, clone density, gVisor restore, warm-pool creates.

- microVM restore latency: a probe guest snapshotted mid-computation (64 MiB of RAM);
  from the `restore` request on a fresh `tartarus-vmm` to the guest running (the
  request returns once its vCPU threads run the restored guest), with and without the
  memory checksum; the peer in the same run is booting the same guest and computing
  to the same point. Firecracker reports about 3 ms on bare metal for its restore.
- clone density: 100 clones of one snapshot whose guest wrote all of its 64 MiB;
  RSS and PSS per clone from /proc/PID/smaps_rollup, idle (paused) and after running
  2 s (a guest that keeps writing a page per round, and one that only loops), against
  one freshly booted VM that wrote the same memory (nothing shared).
- gVisor: restore through the backend against raw `runsc restore` of the same
  checkpoint, when the gVisor backend is available on this host.
- warm pools: `POST /v1/sandboxes` when the pool has a ready sandbox (goal: p50 ≤ 2 ms)
  against the same create restoring from the snapshot (a miss).

Run: `python -m benches.bench_snapshots`.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from tests.support.probe_guests import build_probe_guest
from tests.support.snapshots import (
    GEN_ROUNDS,
    ProbeRuntimes,
    isolated_settings,
    machine,
    serving,
    snapshot_mid_gen,
    snapshot_spinning,
    snapshot_when,
    until,
    vmm_at,
    wait_for,
)

from benches.harness import Stats, ratio, report, write_result
from tartarus.api.types import CreateSandboxRequest, SandboxInfo
from tartarus.host.doctor import run_doctor
from tartarus.images.store import TemplateStore
from tartarus.node.manager import new_sandbox_id
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.gvisor import GvisorRuntime
from tartarus.runtime.microvm import MicroVmRuntime
from tartarus.runtime.types import Backend, SandboxSpec
from tartarus.runtime.vmm_api import RestoreOptions, VmmProcess
from tartarus.sdk.client import Client
from tartarus.sdk.snapshots import Snapshots
from tartarus.server.serve import state_db_path
from tartarus.snapshots.catalog import SnapshotCatalog, SnapshotPurpose
from tartarus.snapshots.service import SandboxFacts, SnapshotService

RESTORE_RUNS = 40
GVISOR_RUNS = 30
CLONES = 100
POOL_RUNS = 60
MEMORY_MIB = 64


async def restore_latency(work: Path) -> dict[str, Any]:
    guest = build_probe_guest()
    snap = work / "gen.snap"
    await snapshot_mid_gen(guest, work, snap)

    async def restore_once(verify: bool) -> tuple[float, int]:
        async with vmm_at(work / "r") as vmm:
            started = time.perf_counter()
            _, done = await vmm.restore(RestoreOptions(snapshot=snap, verify_memory=verify))
            return time.perf_counter() - started, done.duration_us

    async def boot_to_same_point() -> float:
        serial = work / "boot.log"
        serial.unlink(missing_ok=True)
        async with vmm_at(work / "b") as vmm:
            started = time.perf_counter()
            await vmm.configure(machine(guest, serial, f"gen {GEN_ROUNDS}"))
            await vmm.start()
            await wait_for(serial, ".")
            return time.perf_counter() - started

    fast, inside, verified, boots = [], [], [], []
    for i in range(RESTORE_RUNS):
        wall, vmm_us = await restore_once(verify=False)
        fast.append(wall)
        inside.append(vmm_us / 1e6)
        if i % 4 == 0:
            verified.append((await restore_once(verify=True))[0])
            boots.append(await boot_to_same_point())
    ours, peer = Stats.of(fast), Stats.of(boots)
    print(report("microVM restore (API call -> guest running)", ours, peer, "boot to same point"))
    return {
        "guest_memory_mib": MEMORY_MIB,
        "restore_ms": ours,
        "restore_inside_vmm_ms": Stats.of(inside),
        "restore_with_memory_check_ms": Stats.of(verified),
        "peer_boot_and_compute_to_same_point_ms": peer,
        "firecracker_published_restore_ms": 3.0,
    }


def rollup(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name] = int(value[0])
    return fields


def per_clone(pids: list[int]) -> dict[str, float]:
    rows = [rollup(pid) for pid in pids]
    n = len(rows)
    return {
        "rss_mib": round(sum(r["Rss"] for r in rows) / n / 1024, 2),
        "pss_mib": round(sum(r["Pss"] for r in rows) / n / 1024, 2),
        "private_mib": round(
            sum(r["Private_Clean"] + r["Private_Dirty"] for r in rows) / n / 1024, 2
        ),
    }


async def clones_of(snap: Path, work: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per-clone memory of CLONES restores of `snap`: paused, then after running 2 s."""
    async with contextlib.AsyncExitStack() as stack:
        clones: list[VmmProcess] = []
        for i in range(CLONES):
            vmm = await VmmProcess.launch(work / f"c{i}")
            stack.push_async_callback(vmm.kill)
            await vmm.restore(
                RestoreOptions(snapshot=snap, verify_memory=False, resume=False, clone_id=i)
            )
            clones.append(vmm)
        pids = [v.process.pid for v in clones]
        idle = per_clone(pids)
        for vmm in clones:
            await vmm.resume()
        await anyio.sleep(2)
        return idle, per_clone(pids)


async def clone_density(work: Path) -> dict[str, Any]:
    """`walk` wrote all its RAM before the snapshot (every page once, 15872 pages by the
    4th dot) and goes on writing a page per round after the restore: the worst case,
    every clone copies what it writes. `spin` only loops: clones that mostly read."""
    guest = build_probe_guest()
    walk, spin = work / "walk.snap", work / "spin.snap"
    await snapshot_when(guest, work / "w", walk, "walk 100000000", "....")
    walk_idle, walk_running = await clones_of(walk, work / "walk-clones")
    await snapshot_spinning(guest, work / "s", spin)
    _, spin_running = await clones_of(spin, work / "spin-clones")
    async with vmm_at(work / "fresh") as fresh:
        serial = work / "fresh.log"
        await fresh.configure(machine(guest, serial, "walk 100000000"))
        await fresh.start()
        await wait_for(serial, "....")
        alone = per_clone([fresh.process.pid])
    print(
        f"clone density ({CLONES} clones of a guest that wrote its {MEMORY_MIB} MiB): "
        f"PSS per clone paused {walk_idle['pss_mib']} MiB, still writing after 2 s "
        f"{walk_running['pss_mib']} MiB; {CLONES} clones of a spinning guest after 2 s "
        f"{spin_running['pss_mib']} MiB | a fresh VM alone: PSS {alone['pss_mib']} MiB"
    )
    return {
        "clones": CLONES,
        "guest_memory_mib": MEMORY_MIB,
        "per_clone_idle": walk_idle,
        "per_clone_after_running_2s": walk_running,
        "per_clone_spinning_guest_after_2s": spin_running,
        "peer_fresh_vm_same_memory": alone,
    }


@contextlib.asynccontextmanager
async def probe_server(work: Path, pool: int) -> AsyncIterator[tuple[Client, str]]:
    settings = isolated_settings(work)
    runtimes = ProbeRuntimes(
        settings, MicroVmRuntime(settings=settings, doctor=run_doctor(settings))
    )
    directory = work / "spin"
    directory.mkdir()
    await snapshot_spinning(build_probe_guest(), work, directory / "vm.snap")
    seed = SnapshotService(
        SnapshotCatalog(state_db_path(settings)), TemplateStore(settings).blobs, runtimes
    )
    record = await seed.adopt(
        directory,
        Backend.MICROVM,
        SandboxFacts(template="probe"),
        purpose=SnapshotPurpose.TEMPLATE,
    )
    seed.catalog.close()
    async with serving(settings, runtimes) as client:
        await Snapshots(client, owns_client=False).set_pool("probe", pool)
        yield client, record.id


async def pool_creates(work: Path) -> dict[str, Any]:
    pool = 4
    async with probe_server(work, pool) as (client, snapshot_id):
        snaps = Snapshots(client, owns_client=False)

        async def wait_full() -> None:
            async def full() -> bool:
                return (await snaps.pools())[0].ready >= pool

            await until(full, timeout_s=120)

        async def create(request: CreateSandboxRequest) -> tuple[float, SandboxInfo]:
            started = time.perf_counter()
            info = await client.call("POST", "/v1/sandboxes", SandboxInfo, json=request)
            return time.perf_counter() - started, info

        hits, misses = [], []
        for _ in range(POOL_RUNS):
            await wait_full()
            took, info = await create(CreateSandboxRequest(template="probe"))
            assert info.backend_reason.startswith("warm pool hit"), info.backend_reason
            hits.append(took)
            await client.call("DELETE", f"/v1/sandboxes/{info.id}")
        for _ in range(POOL_RUNS // 3):
            took, info = await create(CreateSandboxRequest(from_snapshot=snapshot_id))
            misses.append(took)
            await client.call("DELETE", f"/v1/sandboxes/{info.id}")
        await snaps.set_pool("probe", 0)
    ours, peer = Stats.of(hits), Stats.of(misses)
    print(report("create, warm-pool hit", ours, peer, "create restoring the snapshot"))
    return {
        "pool_size": pool,
        "create_pool_hit_ms": ours,
        "goal_p50_ms": 2.0,
        "peer_create_from_snapshot_ms": peer,
    }


async def raw_restore(
    runtime: GvisorRuntime, image: Path, bundle: Path, container: str, log: Path
) -> float:
    """Seconds a bare `runsc restore --detach` of `image` into `bundle` takes."""
    started = time.perf_counter()
    await runtime.runsc(
        "restore",
        "--image-path",
        str(image),
        "--detach",
        "--bundle",
        str(bundle),
        container,
        log=log,
    )
    return time.perf_counter() - started


async def gvisor_restore(work: Path) -> dict[str, Any]:
    """Ours: Nyx restoring a stored checkpoint (bundle, `runsc restore`, agent connected);
    the peer: bare `runsc restore --detach` of the same image into the same bundle."""
    settings = isolated_settings(work)
    runtimes = HostRuntimes(settings)
    verdict = (await runtimes.report()).backend("gvisor")
    if not verdict.available:
        return {"skipped": f"gvisor unavailable here: {verdict.reason}"}
    service = SnapshotService(
        SnapshotCatalog(state_db_path(settings)), runtimes.templates.blobs, runtimes
    )
    runtime = runtimes.runtime(Backend.GVISOR)
    assert isinstance(runtime, GvisorRuntime)
    spec, _ = await runtimes.prepare(
        SandboxSpec(id=new_sandbox_id(), template="base"), Backend.GVISOR
    )
    sandbox = await runtime.create(spec)
    await sandbox.start()
    record = await service.take(
        sandbox, SandboxFacts(template="base"), purpose=SnapshotPurpose.USER
    )
    bundle = work / "bundle"
    shutil.copytree(sandbox.bundle, bundle)
    # The bundle binds the sandbox's agent directory (the agent's binary and the socket
    # it dials), which goes with the sandbox: the raw restores get a copy of their own.
    agent_dir = sandbox.bundle.parent / "agent"
    shutil.copytree(agent_dir, work / "agent")
    config = bundle / "config.json"
    config.write_text(config.read_text().replace(f'"{agent_dir}"', f'"{work / "agent"}"'))
    await sandbox.kill()
    await runtimes.release(spec.id)
    image = await service.blobs.local_path(record.blob)

    ours, raw = [], []
    for i in range(GVISOR_RUNS):
        clone = SandboxSpec(id=new_sandbox_id(), template="base")
        started = time.perf_counter()
        restored, _, _, _ = await service.restore(record.id, clone)
        ours.append(time.perf_counter() - started)
        await restored.kill()
        await service.release(clone.id)
        container = f"nyx-bench-{i}-{secrets.token_hex(4)}"
        raw.append(await raw_restore(runtime, image, bundle, container, work / "raw-restore.log"))
        await runtime.destroy(container)
    service.catalog.close()
    a, b = Stats.of(ours), Stats.of(raw)
    print(report("gVisor restore (Nyx, agent connected)", a, b, "raw runsc restore"))
    return {
        "checkpoint_bytes": record.size_bytes,
        "nyx_restore_ms": a,
        "raw_runsc_restore_ms": b,
        "ratio": ratio(a, b),
    }


async def main() -> None:
    results: dict[str, Any] = {
        "note": "probe guests under this host's emulated KVM (~1 µs per guest instruction)"
    }
    for name, fn in (
        ("microvm_restore", restore_latency),
        ("clone_density", clone_density),
        ("warm_pool_create", pool_creates),
        ("gvisor_restore", gvisor_restore),
    ):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            results[name] = await fn(Path(tmp))
    print(write_result("snapshots", results))


if __name__ == "__main__":
    anyio.run(main)
