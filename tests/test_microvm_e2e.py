"""MicroVMs end to end: the real guest kernel, a real ext4 root, the agent over vsock.

These need a host whose KVM runs full guests (hardware VMX/SVM); elsewhere they skip
with the doctor probe's measured reason (see conftest.py). They use only the `Runtime`
and `Sandbox` protocols, so they test what the server and SDK rely on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from tartarus.config import load_settings
from tartarus.runtime.base import Runtime, Sandbox, SandboxError
from tartarus.runtime.types import ExecRequest, ExecResult, Resources, SandboxSpec, SandboxState
from tests.guest_rootfs import busybox_rootfs
from tests.support.scratch_disk import read_ext4_file

pytestmark = [pytest.mark.kvm_full, pytest.mark.anyio, pytest.mark.timeout(900)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    return busybox_rootfs(tmp_path / "rootfs")


@pytest.fixture
def runtime(guest_kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    # A private runtime dir: sockets and disks of these tests live (and die) there.
    monkeypatch.setenv("TARTARUS_RUNTIME_DIR", str(tmp_path / "run"))
    from tartarus.runtime.microvm import MicroVmRuntime  # noqa: PLC0415 - kvm hosts only

    return MicroVmRuntime(kernel=guest_kernel, settings=load_settings())


def _spec(rootfs: Path, name: str, memory_mib: int = 256) -> SandboxSpec:
    return SandboxSpec(
        id=f"e2e-{name}-{os.getpid()}",
        rootfs=rootfs,
        resources=Resources(memory_mib=memory_mib, vcpus=1),
    )


async def _run(sb: Sandbox, *argv: str, **kw: Any) -> ExecResult:
    execution = await sb.exec(ExecRequest(argv=list(argv), **kw))
    return await execution.wait()


async def _started(runtime: Runtime, spec: SandboxSpec) -> Sandbox:
    sb = await runtime.create(spec)
    await sb.start()
    return sb


def _processes_named(name: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name[:15]:
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


async def test_boots_to_agent_ready_and_runs_a_command(runtime: Runtime, rootfs: Path) -> None:
    sb = await _started(runtime, _spec(rootfs, "boot"))
    try:
        assert (await sb.status()).state is SandboxState.RUNNING
        result = await _run(sb, "/bin/echo", "hello from the guest")
        assert result.stdout == b"hello from the guest\n"
        assert result.exit.code == 0
        # PID 1 is the agent (installed as /sbin/init), booted from the read-only template
        # image, which it put under a writable overlay on the scratch disk.
        init = await _run(sb, "/bin/cat", "/proc/1/cmdline")
        assert init.stdout.split(b"\0")[:3] == [b"/sbin/init", b"serve", b"--init"], init.stdout
        mounts = (await _run(sb, "/bin/cat", "/proc/mounts")).stdout.decode()
        assert any(
            line.split()[1] == "/" and line.split()[2] == "overlay" for line in mounts.splitlines()
        ), mounts
    finally:
        await sb.stop(grace_s=5)


async def test_exec_reports_output_codes_env_cwd_and_timeouts(
    runtime: Runtime, rootfs: Path
) -> None:
    sb = await _started(runtime, _spec(rootfs, "exec"))
    try:
        r = await _run(sb, "/bin/sh", "-c", "echo out; echo err >&2; exit 7")
        assert (r.stdout, r.stderr, r.exit.code) == (b"out\n", b"err\n", 7)
        r = await _run(
            sb, "/bin/sh", "-c", "echo $GREETING; pwd", env={"GREETING": "hi"}, cwd="/tmp"
        )
        assert r.stdout == b"hi\n/tmp\n"
        r = await _run(sb, "/bin/sleep", "60", timeout_s=1.0)
        assert r.exit.timed_out
        big = await _run(sb, "/bin/sh", "-c", "head -c 5000000 /dev/zero")
        assert len(big.stdout) == 5_000_000
    finally:
        await sb.stop(grace_s=5)


async def test_files_round_trip_on_the_scratch_disk(runtime: Runtime, rootfs: Path) -> None:
    sb = await _started(runtime, _spec(rootfs, "files"))
    try:
        payload = os.urandom(3 << 20)
        await sb.make_dir("/tmp/work/sub", parents=True)
        await sb.write_file("/tmp/work/sub/blob", payload, mode=0o600)
        assert await sb.read_file("/tmp/work/sub/blob") == payload
        info = await sb.stat("/tmp/work/sub/blob")
        assert (info.size, info.mode & 0o777) == (len(payload), 0o600)
        names = [f.name for f in await sb.list_dir("/tmp/work/sub")]
        assert names == ["blob"]
        await sb.rename("/tmp/work/sub/blob", "/tmp/work/blob2")
        checksum = await _run(sb, "/bin/sha256sum", "/tmp/work/blob2")
        assert checksum.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        await sb.remove("/tmp/work", recursive=True)
        with pytest.raises(SandboxError):
            await sb.stat("/tmp/work")
    finally:
        await sb.stop(grace_s=5)


async def test_root_is_writable_on_the_scratch_disk_and_wiped_on_kill(
    runtime: Runtime, rootfs: Path
) -> None:
    from tartarus.runtime.microvm import MicroVmSandbox  # noqa: PLC0415 - kvm hosts only

    sb = await _started(runtime, _spec(rootfs, "overlay"))
    assert isinstance(sb, MicroVmSandbox)
    scratch = sb.run_dir / "scratch.ext4"
    assert scratch.exists(), scratch
    try:
        payload = os.urandom(1 << 20)
        await sb.make_dir("/root", parents=True)
        await sb.write_file("/root/data", payload)
        assert await sb.read_file("/root/data") == payload
        r = await _run(sb, "/bin/sh", "-c", "echo x > /etc/x && cat /etc/x && sync")
        assert r.stdout == b"x\n"
        # The guest's writes are on the scratch disk, not in the template image.
        assert read_ext4_file(scratch, "/overlay/upper/root/data", live=True) == payload
        assert not (rootfs / "etc" / "x").exists()
    finally:
        await sb.kill()
    assert not scratch.exists(), "the scratch disk is gone with the sandbox"
    assert not sb.workdir.exists()


# Ten, on hardware and in the nested-KVM lane; TARTARUS_TEST_CONCURRENT_MICROVMS changes it.
CONCURRENT_MICROVMS = int(os.environ.get("TARTARUS_TEST_CONCURRENT_MICROVMS", "10"))


async def test_concurrent_microvms_are_isolated(runtime: Runtime, rootfs: Path) -> None:
    boot_ids: dict[int, bytes] = {}
    sandboxes: list[Sandbox] = []

    async def one(i: int) -> None:
        sb = await _started(runtime, _spec(rootfs, f"many{i}", memory_mib=128))
        sandboxes.append(sb)
        await sb.write_file("/tmp/mine", str(i).encode())
        boot_ids[i] = (await _run(sb, "/bin/cat", "/proc/sys/kernel/random/boot_id")).stdout
        assert await sb.read_file("/tmp/mine") == str(i).encode()

    try:
        async with anyio.create_task_group() as tg:
            for i in range(CONCURRENT_MICROVMS):
                tg.start_soon(one, i)
        assert len(set(boot_ids.values())) == CONCURRENT_MICROVMS
    finally:
        for sb in sandboxes:
            await sb.kill()


async def test_guest_memory_limit_is_enforced(runtime: Runtime, rootfs: Path) -> None:
    sb = await _started(runtime, _spec(rootfs, "mem", memory_mib=128))
    try:
        meminfo = (await _run(sb, "/bin/cat", "/proc/meminfo")).stdout.decode()
        total_kib = int(
            next(line for line in meminfo.splitlines() if line.startswith("MemTotal")).split()[1]
        )
        assert total_kib <= 128 * 1024
        # Filling more than the VM has cannot succeed: the guest runs out, not the host.
        # (/tmp is on the scratch disk, so a buffer, not a file, has to be the hog.)
        hog = await _run(
            sb, "/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=400M", "count=1", timeout_s=120
        )
        assert hog.exit.code != 0 or hog.exit.oom_killed or hog.exit.signal is not None
        # The host side stays bounded too: guest RAM plus the VMM's own few MiB.
        stats = await sb.stats()
        assert stats.memory_bytes <= (128 + 32) << 20
        assert stats.memory_limit_bytes == 128 << 20
    finally:
        await sb.kill()


async def test_shutdown_leaves_no_processes_sockets_or_files(
    runtime: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    before = _processes_named("tartarus-vmm")
    sb = await _started(runtime, _spec(rootfs, "clean"))
    during = _processes_named("tartarus-vmm") - before
    assert during, "the sandbox runs a tartarus-vmm process"
    run_dir = tmp_path / "run"
    assert any(run_dir.rglob("*")), "the VMM keeps its sockets and disks in the runtime dir"
    await _run(sb, "/bin/sh", "-c", "head -c 1000000 /dev/urandom > /tmp/scratch-data")
    await sb.stop(grace_s=5)
    assert (await sb.status()).state is SandboxState.STOPPED
    for _ in range(200):  # the VMM is gone within 10 s
        if not _processes_named("tartarus-vmm") & during:
            break
        await anyio.sleep(0.05)
    assert not _processes_named("tartarus-vmm") & during
    leftovers = [p for p in run_dir.rglob("*") if not p.is_dir()]
    assert leftovers == [], leftovers
    assert await runtime.reap(set()) == []


async def test_a_snapshot_restores_as_clones_that_go_on_with_their_own_entropy(
    runtime: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    """Boot, write state, snapshot; then three clones, each restored in a new VMM, find
    that state, answer exec, and read different random bytes: each agent mixed fresh host
    entropy into its kernel's RNG, which the clones otherwise share from the snapshot. Each
    clone has its own VM id (the clone id its sandbox id gives). A damaged snapshot is
    refused with an error that names it."""
    from tartarus.runtime.microvm import MicroVmSandbox, clone_id_of  # noqa: PLC0415

    # The source stays up while its clones run: its root image (built from `rootfs` in
    # its own directory, unlike a template's shared one) goes when it does.
    sb = await _started(runtime, _spec(rootfs, "snap"))
    randoms = set()
    try:
        await _run(sb, "/bin/sh", "-c", "echo before the snapshot > /tmp/state")
        assert isinstance(sb, MicroVmSandbox)
        info = await sb.snapshot(tmp_path / "snap")
        for i in range(1, 4):
            spec = SandboxSpec(id=f"sb-{i:016x}", resources=Resources(memory_mib=256, vcpus=1))
            clone = await runtime.restore(info, spec)
            try:
                assert isinstance(clone, MicroVmSandbox) and clone.restore_report is not None
                assert clone.restore_report.clone_id == clone_id_of(spec.id) == i
                state = await _run(clone, "/bin/cat", "/tmp/state")
                assert state.stdout == b"before the snapshot\n"
                drawn = await _run(clone, "/bin/sh", "-c", "head -c 32 /dev/urandom | od -An -tx1")
                assert drawn.exit.code == 0 and drawn.stdout.strip()
                randoms.add(drawn.stdout)
            finally:
                await clone.kill()
        assert len(randoms) == 3, "clones drew the same random bytes: no reseed happened"
        image = info.path / "vm.snap"
        data = bytearray(image.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 4096] = b"\xff" * 4096
        image.write_bytes(bytes(data))
        with pytest.raises(SandboxError, match="snapshot"):
            bad = await runtime.restore(info, SandboxSpec(id="sb-0000000000000009"))
            await bad.kill()
    finally:
        await sb.kill()


async def test_a_paused_microvm_resumes_under_its_id_with_its_processes(
    runtime: Runtime, rootfs: Path, tmp_path: Path
) -> None:
    """Pause (Hypnos) on microvm: `suspend` writes a snapshot and ends the VM (no VMM
    process left); a restore under the same id carries on with the same processes."""
    spec = _spec(rootfs, "pause")
    counter = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
    sb = await _started(runtime, spec)
    try:
        await sb.exec(ExecRequest(argv=["/bin/sh", "-c", counter], background=True))
        await anyio.sleep(1)
        before = int((await _run(sb, "/bin/cat", "/tmp/count")).stdout)
        vmms = _processes_named("tartarus-vmm")
        info = await sb.suspend(tmp_path / "paused")
        assert info.size_bytes > 0
        assert (await sb.status()).state is not SandboxState.RUNNING
        assert vmms - _processes_named("tartarus-vmm"), "its VMM outlived the pause"
        sb = await runtime.restore(info, spec)
        after = int((await _run(sb, "/bin/cat", "/tmp/count")).stdout)
        assert after >= before, (before, after)
        await anyio.sleep(1)
        assert int((await _run(sb, "/bin/cat", "/tmp/count")).stdout) > after
    finally:
        await sb.kill()
