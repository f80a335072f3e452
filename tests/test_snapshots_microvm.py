"""MicroVM snapshots (Nyx) with real `tartarus-vmm` processes and the probe guest.

A guest paused mid-computation is snapshotted and restored in a new VMM process (and
as 50 clones) and finishes with the right result; diff snapshots restore on their
base; corrupted, truncated and foreign snapshots are refused with a clear error; the
microVM backend restores through the same path. Linux-guest snapshots need a host
whose KVM runs full guests (`kvm_full`).
"""

from __future__ import annotations

import array
import os
import re
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tartarus import _core
from tartarus.binaries import find_binary
from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient, AgentError
from tartarus.runtime.microvm import MicroVmRuntime, clone_id_of, reseed_guest
from tartarus.runtime.types import Backend, SandboxSpec, SandboxState, SnapshotInfo
from tartarus.runtime.vmm_api import (
    DriveConfig,
    MachineConfig,
    RateLimit,
    RestoreOptions,
    SerialFile,
    SnapshotKind,
    VmmError,
    VmState,
)
from tests.support.agent import running_agent
from tests.support.probe_guests import build_probe_guest, walk_result, xorshift_result
from tests.support.snapshots import GEN_ROUNDS, machine, our_vmms, vmm_at, wait_for
from tests.support.snapshots import snapshot_mid_gen as take_mid_gen

pytestmark = [pytest.mark.timeout(240), pytest.mark.anyio]

GEN_LINE = re.compile(
    r"compute=(?P<compute>[0-9a-f]{16}) magic=(?P<magic>[0-9a-f]{16}) "
    r"generation=(?P<generation>[0-9a-f]{16}) clone=(?P<clone>[0-9a-f]{16}) "
    r"vmid=(?P<vmid>[0-9a-f]{16}) entropy=(?P<entropy>[0-9a-f]{16})\n$"
)
TGEN = int.from_bytes(b"TGEN", "little")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_probe_guest()


@pytest.fixture(scope="module")
def vmm_bin(doctor_report: DoctorReport) -> str:
    kvm = doctor_report.kernel.kvm
    if not kvm.openable:
        pytest.skip(f"no usable /dev/kvm: {kvm.detail}")
    return str(find_binary("tartarus-vmm"))


async def snapshot_mid_gen(guest: Path, tmp_path: Path) -> tuple[Path, str]:
    snap = tmp_path / "gen.snap"
    before = await take_mid_gen(guest, tmp_path, snap)
    info = _core.inspect_snapshot(snap)
    assert info["kind"] == "full" and info["parent"] is None
    assert info["memory_mib"] == 64 and info["pages"] == (64 << 20) // 4096
    assert info["file_bytes"] == snap.stat().st_size
    return snap, before


async def restore_and_finish(
    snap: Path, workdir: Path, *, clone_id: int = 0, base: Path | None = None, **kw: Any
) -> str:
    serial = workdir.with_suffix(".log")
    async with vmm_at(workdir) as vmm:
        state, restored = await vmm.restore(
            RestoreOptions(
                snapshot=snap,
                base=base,
                serial=SerialFile(path=serial),
                clone_id=clone_id,
                **kw,
            )
        )
        assert state.state is VmState.RUNNING
        assert restored.clone_id == clone_id
        final = await vmm.wait(60)
        assert final.exit is not None and final.exit.reason == "reset", final
    return serial.read_text()


def parse_gen(output: str) -> dict[str, int]:
    m = GEN_LINE.search(output)
    assert m, output
    return {k: int(v, 16) for k, v in m.groupdict().items()}


# ---- restore in a new process ------------------------------------------------------


async def test_guest_paused_mid_computation_finishes_after_restore_in_a_new_vmm(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    snap, before = await snapshot_mid_gen(guest, tmp_path)
    assert before == ".", "paused after the first dot, before the result"
    after = await restore_and_finish(snap, tmp_path / "restored", clone_id=7)
    # The instruction that printed the dot finished before the snapshot: no repeat.
    assert (before + after).count(".") == -(-GEN_ROUNDS // 16384)
    got = parse_gen(after)
    assert got["compute"] == xorshift_result(GEN_ROUNDS)
    assert got["magic"] == TGEN
    assert (got["generation"], got["clone"]) == (1, 7)
    assert not our_vmms(tmp_path)


async def test_fifty_clones_of_one_snapshot_each_finish_and_diverge(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    outputs: dict[int, str] = {}
    limiter = anyio.CapacityLimiter(10)

    async def clone(i: int) -> None:
        async with limiter:
            outputs[i] = await restore_and_finish(
                snap, tmp_path / f"clone{i}", clone_id=i, verify_memory=i == 0
            )

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(clone, i)
    results = {i: parse_gen(out) for i, out in outputs.items()}
    assert len(results) == 50
    assert {r["compute"] for r in results.values()} == {xorshift_result(GEN_ROUNDS)}
    assert all(r["generation"] == 1 and r["clone"] == i for i, r in results.items())
    # Every clone got its own identity and entropy from the generation device.
    assert len({r["vmid"] for r in results.values()}) == 50
    assert len({r["entropy"] for r in results.values()}) == 50
    assert not our_vmms(tmp_path)


async def test_clones_share_the_snapshot_pages_they_did_not_write(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    async with vmm_at(tmp_path / "a") as a, vmm_at(tmp_path / "b") as b:
        for vmm in (a, b):
            await vmm.restore(RestoreOptions(snapshot=snap, resume=False))
        # Both map the same file privately: its pages are shared, not copied.
        for vmm in (a, b):
            smaps = await anyio.Path(f"/proc/{vmm.process.pid}/smaps").read_text()
            block = smaps.split(str(snap), 1)[1].split("VmFlags", 1)[0]
            fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", block, re.M))
            assert int(fields["Size"]) == 64 << 10
            assert int(fields["Anonymous"]) < 1024, "hardly any page was copied"


# ---- the guest's RNG after a restore ----------------------------------------------


async def test_a_restored_guest_agent_reseeds_its_rng(tmp_path: Path) -> None:
    """What the microVM backend sends the guest agent once it reconnects after a
    restore, against a real agent (on a unix socket here: no Linux guest runs on this
    host's KVM). As root it credits the bytes and reseeds the kernel RNG at once."""
    with running_agent(tmp_path) as (proc, socket):
        async with await AgentClient.connect_unix(socket) as agent:
            assert agent.hello is not None and "reseed" in agent.hello.features
            assert await reseed_guest(agent, generation=1)
            for size in (0, 15, 513):
                with pytest.raises(AgentError, match=f"not {size}") as e:
                    await agent.call(p.Reseed(entropy=b"\1" * size, generation=1))
                assert e.value.code == "invalid_argument"
            # An agent from before reseeding existed: the restore goes on, with a warning.
            assert agent.hello is not None
            agent.hello = msgspec.structs.replace(agent.hello, features=["exec"])
            assert not await reseed_guest(agent, generation=2)
            await agent.call_expect(p.Ping(), p.Pong)
        assert proc.poll() is None


# ---- diff snapshots ----------------------------------------------------------------


async def test_diff_snapshots_from_the_kvm_dirty_log_and_from_a_restore(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    rounds = 4096 * 6
    full, diff, diff2 = tmp_path / "full.snap", tmp_path / "diff.snap", tmp_path / "d2.snap"
    serial = tmp_path / "origin.log"
    async with vmm_at(tmp_path / "origin") as vmm:
        await vmm.configure(machine(guest, serial, f"walk {rounds}", track_dirty_pages=True))
        await vmm.start()
        await wait_for(serial, ".")
        assert (await vmm.snapshot(full)).kind is SnapshotKind.FULL
        assert (await vmm.state()).state is VmState.RUNNING, "it was running: it runs on"
        await wait_for(serial, ".", 2)
        await vmm.pause()
        d = await vmm.snapshot(diff, SnapshotKind.DIFF)
    base_id = _core.inspect_snapshot(full)["id"]
    assert d.parent == base_id
    # The guest wrote about one page per round between the two snapshots.
    assert 1000 < d.pages < 16384 // 2
    assert d.file_bytes < full.stat().st_size // 2
    out = await restore_and_finish(diff, tmp_path / "from-diff", base=full)
    assert out.endswith(f"walk={walk_result(rounds, 64):016x}\n")

    # A machine restored from `full` takes diffs against it without KVM's log.
    serial = tmp_path / "second.log"
    async with vmm_at(tmp_path / "second") as vmm:
        await vmm.restore(RestoreOptions(snapshot=full, serial=SerialFile(path=serial)))
        await wait_for(serial, ".", 2)
        d2 = await vmm.snapshot(diff2, SnapshotKind.DIFF)
    assert d2.parent == base_id and d2.pages > 1000
    out = await restore_and_finish(diff2, tmp_path / "from-diff2", base=full)
    assert out.endswith(f"walk={walk_result(rounds, 64):016x}\n")

    # A diff needs its own parent as base, and a base at all.
    other, _ = await snapshot_mid_gen(guest, tmp_path)
    for base, needle in ((other, "is not the parent"), (None, "pass its parent")):
        async with vmm_at(tmp_path / "wrong") as vmm:
            with pytest.raises(VmmError) as e:
                await vmm.restore(RestoreOptions(snapshot=diff, base=base))
        assert e.value.kind == "snapshot" and needle in str(e.value)


async def test_a_diff_needs_a_parent(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    async with vmm_at(tmp_path / "vm") as vmm:
        await vmm.configure(machine(guest, tmp_path / "s.log", "spin"))
        await vmm.start()
        with pytest.raises(VmmError) as e:
            await vmm.snapshot(tmp_path / "d.snap", SnapshotKind.DIFF)
        assert "needs a parent" in str(e.value)
        assert not (tmp_path / "d.snap").exists()
        partial = [p async for p in anyio.Path(tmp_path).glob(".d.snap.partial-*")]
        assert not partial, "no partial file is left"


# ---- virtio devices ----------------------------------------------------------------


async def test_a_disk_read_held_back_by_a_rate_limit_finishes_after_restore(
    vmm_bin: str, tmp_path: Path
) -> None:
    """The virtio probe reads a 4 MiB disk at 1 MiB/s: a snapshot lands mid-read, with
    requests queued, and the restored clone's disk picks them up and finishes."""
    guest = build_probe_guest("virtio_probe")
    disk = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    await anyio.Path(disk).write_bytes(data)
    drive = DriveConfig(path=disk, read_only=True, rate_limit=RateLimit(bytes_per_sec=1 << 20))
    serial = tmp_path / "origin.log"
    snap = tmp_path / "disk.snap"
    async with vmm_at(tmp_path / "origin") as vmm:
        await vmm.configure(machine(guest, serial, "b", memory_mib=16, drives=[drive]))
        await vmm.start()
        await anyio.sleep(1)  # the read takes at least 3 s at this rate
        assert (await vmm.pause()).state is VmState.PAUSED
        assert serial.read_text() == "", "the guest has not finished reading"
        await vmm.snapshot(snap)
    assert len(_core.inspect_snapshot(snap)["drives"]) == 1
    out = await restore_and_finish(snap, tmp_path / "clone", drives=[drive])
    total = sum(array.array("Q", data)) & (2**64 - 1)
    assert out == f"blk capacity={(4 << 20) // 512:016x} sum={total:016x}\n"


# ---- refusals ----------------------------------------------------------------------


def _damaged(snap: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(snap.read_bytes())
    info = _core.inspect_snapshot(snap)
    assert info["file_bytes"] == len(data)
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "header_cut":
        data = data[:100]
    elif how == "header_flip":
        data[40] ^= 0x01
    elif how == "state_flip":
        data[4096 + 10] ^= 0x80
    elif how == "memory_flip":
        data[-4096 * 100] ^= 0x01
    elif how == "other_version":
        data[8:12] = (99).to_bytes(4, "little")
    elif how == "not_a_snapshot":
        data[:8] = b"ELF\x7f...."
    elif how == "longer":
        data += b"\0" * 4096
    out = tmp_path / f"{how}.snap"
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("truncated", "is truncated"),
        ("header_cut", "is truncated"),
        ("header_flip", "header checksum does not match"),
        ("state_flip", "state section's sha256 does not match"),
        ("memory_flip", "memory section's sha256 does not match"),
        ("other_version", "format version 99"),
        ("not_a_snapshot", "is not a Tartarus snapshot"),
        ("longer", "more than its header says"),
    ],
)
async def test_damaged_snapshots_are_refused_with_a_clear_error(
    vmm_bin: str, guest: Path, tmp_path: Path, how: str, needle: str
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    bad = _damaged(snap, tmp_path, how)
    async with vmm_at(tmp_path / "vm") as vmm:
        with pytest.raises(VmmError) as e:
            await vmm.restore(RestoreOptions(snapshot=bad, verify_memory=True))
        assert e.value.kind == "snapshot"
        assert needle in str(e.value) and str(bad) in str(e.value)
        # The refusal built nothing: the same VMM restores a good snapshot.
        assert (await vmm.state()).state is VmState.NOT_CONFIGURED
        state, _ = await vmm.restore(RestoreOptions(snapshot=snap, resume=False))
        assert state.state is VmState.PAUSED
    with pytest.raises(_core.SnapshotError, match=re.escape(needle)):
        _core.inspect_snapshot(bad, verify_memory=True)
    proc = await anyio.run_process([vmm_bin, "inspect-snapshot", str(bad), "--verify"], check=False)
    assert proc.returncode == 1 and needle in proc.stderr.decode()
    assert b"panicked" not in proc.stderr


async def test_snapshot_requests_in_the_wrong_state_are_refused(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    async with vmm_at(tmp_path / "vm") as vmm:
        with pytest.raises(VmmError) as e:
            await vmm.snapshot(tmp_path / "x.snap")
        assert e.value.kind == "invalid_state"
        await vmm.restore(RestoreOptions(snapshot=snap))
        with pytest.raises(VmmError) as e:
            await vmm.restore(RestoreOptions(snapshot=snap))
        assert e.value.kind == "invalid_state"
        with pytest.raises(VmmError) as e:
            await vmm.snapshot(tmp_path / "missing-dir" / "x.snap")
        assert e.value.kind == "internal" and "missing-dir" in str(e.value)
        await vmm.wait(60)
        with pytest.raises(VmmError) as e:
            await vmm.snapshot(tmp_path / "y.snap")
        assert e.value.kind == "invalid_state", "an exited guest has nothing to save"


async def test_inspect_reports_what_a_snapshot_holds(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    info = _core.inspect_snapshot(snap, verify_memory=True)
    assert info["kind"] == "full" and info["parent"] is None
    assert (info["vcpus"], info["memory_mib"]) == (1, 64)
    assert info["cmdline"] == f"gen {GEN_ROUNDS}"
    assert info["format_version"] == 1 and info["memory_verified"]
    assert info["generation"] == 0
    proc = await anyio.run_process([vmm_bin, "inspect-snapshot", str(snap)])
    assert msgspec.json.decode(proc.stdout)["id"] == info["id"]


# ---- the microVM backend -----------------------------------------------------------


async def test_microvm_backend_restores_and_takes_diffs(
    vmm_bin: str, guest: Path, tmp_path: Path, doctor_report: DoctorReport
) -> None:
    snap, _ = await snapshot_mid_gen(guest, tmp_path)
    snap_dir = tmp_path / "taken"
    await anyio.Path(snap_dir).mkdir()
    await anyio.Path(snap).rename(snap_dir / "vm.snap")
    settings = Settings(runtime_dir=tmp_path / "run")
    runtime = MicroVmRuntime(settings=settings, doctor=doctor_report)
    info = SnapshotInfo(backend=Backend.MICROVM, path=snap_dir, size_bytes=0, source_sandbox="x")
    spec = SandboxSpec(id="sb-00000000000000ff", backend=Backend.MICROVM)
    sandbox = await runtime.restore(info, spec)
    try:
        assert sandbox.restore_report is not None
        assert sandbox.restore_report.memory_verified, "the first restore checks memory"
        assert sandbox.restore_report.clone_id == clone_id_of(spec.id) == 0xFF
        diff = await sandbox.snapshot(tmp_path / "out")
        assert diff.base == snap_dir and diff.path == tmp_path / "out"
        assert _core.inspect_snapshot(diff.path / "vm.snap")["kind"] == "diff"
        status = await sandbox.status()
        assert status.state in (SandboxState.RUNNING, SandboxState.STOPPED)
    finally:
        await sandbox.kill()
    for n, verified in ((0x100, True), (0x101, False)):
        again = await runtime.restore(diff, SandboxSpec(id=f"sb-{n:016x}", backend=Backend.MICROVM))
        try:
            assert again.restore_report is not None
            assert again.restore_report.kind is SnapshotKind.DIFF
            # Memory is read through once per file; the second restore trusts that check.
            assert again.restore_report.memory_verified is verified
        finally:
            await again.kill()
        assert not again.workdir.exists()
    assert not sandbox.workdir.exists()
    assert not our_vmms(tmp_path)


@pytest.mark.kvm_full
async def test_linux_microvm_snapshot_restores_as_clones(
    vmm_bin: str, guest_kernel: Path, tmp_path: Path
) -> None:
    """On hardware KVM: a Linux guest booted to its console, snapshotted, and restored
    as three clones that each keep running."""
    serial = tmp_path / "boot.log"
    snap = tmp_path / "linux.snap"
    async with vmm_at(tmp_path / "boot") as vmm:
        await vmm.configure(
            MachineConfig(
                memory_mib=256,
                kernel=guest_kernel,
                cmdline="console=ttyS0 reboot=k panic=-1 pci=off",
                serial=SerialFile(path=serial),
            )
        )
        await vmm.start()
        await wait_for(serial, "Linux version")
        await vmm.snapshot(snap)
    for i in range(3):
        async with vmm_at(tmp_path / f"clone{i}") as clone:
            state, report = await clone.restore(RestoreOptions(snapshot=snap, clone_id=i))
            assert state.state is VmState.RUNNING and report.generation == 1
            await anyio.sleep(1)
            assert (await clone.state()).state is not VmState.EXITED
