"""The agent-backed Linux backends (jail, gvisor) end to end: real namespaces and
cgroups, real runsc, the real agent, a busybox rootfs. Every test checks that the
sandbox left nothing behind (processes, cgroups, runsc containers, files)."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.runtime.base import NotSupportedError, Runtime, Sandbox, SandboxError
from tartarus.runtime.gvisor import GvisorRuntime, GvisorSandbox
from tartarus.runtime.jail import JailRuntime, JailSandbox
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    ExitStatus,
    OutputChunk,
    Resources,
    SandboxSpec,
    SandboxState,
)
from tests.runtime_checks import expected_flood
from tests.support.backends import LINUX_BACKENDS, available_backend
from tests.support.snapshots import moved_past

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]


def make_runtime(backend: Backend, state: Path) -> Runtime:
    if backend is Backend.JAIL:
        return JailRuntime(state)
    return GvisorRuntime(state)


@pytest.fixture(params=LINUX_BACKENDS, ids=lambda b: b.value)
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    return available_backend(request, doctor_report)


@pytest.fixture
def runtime(backend: Backend, tmp_path: Path) -> Iterator[Runtime]:
    rt = make_runtime(backend, tmp_path / "state")
    yield rt
    if isinstance(rt, JailRuntime):
        rt.remove_cgroup_scope()


def spec_for(rootfs: Path, name: str = "sb", **kw: Any) -> SandboxSpec:
    resources = kw.pop("resources", Resources(memory_mib=128, pids=64, disk_mib=256))
    return SandboxSpec(id=name, rootfs=rootfs, resources=resources, **kw)


def assert_gone(sb: Sandbox, state: Path) -> None:
    """Nothing of the sandbox survives its kill: processes, cgroups, files."""
    if isinstance(sb, JailSandbox):
        if sb.init_pid is not None:
            assert not Path(f"/proc/{sb.init_pid}").exists(), "jail init survived"
        for d in sb._cgroup.dirs:
            assert not d.path.exists(), f"cgroup {d.path} left behind"
    assert isinstance(sb, JailSandbox | GvisorSandbox)
    assert not sb._dir.exists()
    assert list(state.glob(f"*/{sb.id}")) == []


async def assert_no_leftovers(sb: Sandbox, runtime: Runtime, state: Path) -> None:
    """As `assert_gone`, and its runsc container is gone."""
    await anyio.to_thread.run_sync(assert_gone, sb, state)
    if isinstance(runtime, GvisorRuntime):
        assert isinstance(sb, GvisorSandbox)
        assert sb.container not in await runtime.containers()


@pytest.fixture
async def sandbox(runtime: Runtime, base_rootfs: Path, tmp_path: Path) -> AsyncIterator[Sandbox]:
    sb = await runtime.create(spec_for(base_rootfs))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.kill()
    await assert_no_leftovers(sb, runtime, tmp_path / "state")


async def sh(sb: Sandbox, script: str, **kw: Any) -> tuple[bytes, bytes, ExitStatus]:
    execution = await sb.exec(ExecRequest(shell=script, **kw))
    result = await execution.wait()
    return result.stdout, result.stderr, result.exit


async def test_echo(sandbox: Sandbox) -> None:
    result = await (await sandbox.exec(ExecRequest(argv=["echo", "hello"]))).wait()
    assert result.stdout == b"hello\n"
    assert result.exit.ok


async def test_failing_command_keeps_exit_code(sandbox: Sandbox) -> None:
    out, err, status = await sh(sandbox, "echo bad >&2; exit 3")
    assert (out, err, status.code) == (b"", b"bad\n", 3)


async def test_timeout_kills_the_command(sandbox: Sandbox) -> None:
    _, _, status = await sh(sandbox, "sleep 30", timeout_s=0.5)
    assert status.timed_out
    assert status.code is None


async def test_stdin_round_trip(sandbox: Sandbox) -> None:
    execution = await sandbox.exec(ExecRequest(argv=["cat"], stdin=True))
    payload = b"".join(b"line %d\n" % i for i in range(20000))
    await execution.write_stdin(payload)
    await execution.close_stdin()
    result = await execution.wait()
    assert result.stdout == payload


async def test_ten_megabytes_stream_in_order(sandbox: Sandbox) -> None:
    size = 10 << 20
    expected = expected_flood(size)
    await sandbox.write_file("/tmp/big", expected)
    execution = await sandbox.exec(ExecRequest(argv=["cat", "/tmp/big"]))
    received = bytearray()
    last_seq: int | None = None
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            assert last_seq is None or event.seq == last_seq + 1  # no gap: nothing dropped
            last_seq = event.seq
            received += event.data
        else:
            assert event.ok
            assert event.dropped_chunks == 0
    assert bytes(received) == expected


async def test_file_round_trip(sandbox: Sandbox) -> None:
    await sandbox.write_file("/root/note.txt", b"from the host")
    out, _, _ = await sh(sandbox, "cat /root/note.txt; echo ' and back' >> /root/note.txt")
    assert out == b"from the host"
    assert await sandbox.read_file("/root/note.txt") == b"from the host and back\n"


async def test_twenty_concurrent_execs(sandbox: Sandbox) -> None:
    outputs: dict[int, bytes] = {}

    async def one(i: int) -> None:
        outputs[i] = (await sh(sandbox, f"sleep 0.2; echo {i}"))[0]

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert outputs == {i: f"{i}\n".encode() for i in range(20)}


async def test_ten_sandboxes_at_once(runtime: Runtime, base_rootfs: Path, tmp_path: Path) -> None:
    outputs: dict[int, bytes] = {}

    async def one(i: int) -> None:
        sb = await runtime.create(spec_for(base_rootfs, f"many{i}"))
        try:
            await sb.start()
            outputs[i] = (await sh(sb, f"echo {i}"))[0]
        finally:
            await sb.kill()
        await assert_no_leftovers(sb, runtime, tmp_path / "state")

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
    assert outputs == {i: f"{i}\n".encode() for i in range(10)}
    if isinstance(runtime, GvisorRuntime):
        assert await runtime.containers() == []


async def test_host_secrets_and_paths_are_out_of_reach(sandbox: Sandbox, base_rootfs: Path) -> None:
    shadow = await anyio.Path("/etc/shadow").read_bytes()
    out, _, _ = await sh(sandbox, "cat /etc/shadow /../../etc/shadow 2>&1; ls /work 2>&1")
    assert shadow[:20] not in out
    assert b"wt" not in out
    marker = f"escape-{secrets.token_hex(4)}"
    _, _, status = await sh(
        sandbox, f"echo x > /../../tmp/{marker}; echo y > /etc/{marker}; mkdir /{marker}"
    )
    assert status.ok  # written inside the sandbox's own scratch layer
    for host_path in (Path("/tmp"), base_rootfs / "etc", base_rootfs):
        assert not await anyio.Path(host_path / marker).exists()


async def sandbox_survived(sb: Sandbox) -> bool:
    """After a resource attack: the jail contains it inside the sandbox, which keeps
    running; gVisor's limits are host cgroups around the whole sandbox (sentry and all),
    so the host stops the sandbox as a unit. Either way the host is untouched."""
    if sb.backend is Backend.GVISOR:
        state = (await sb.status()).state
        if state is not SandboxState.RUNNING:
            return False
    out, _, _ = await sh(sb, "echo still alive")
    assert out == b"still alive\n"
    return True


async def test_fork_bomb_is_contained_by_the_pids_limit(sandbox: Sandbox) -> None:
    # The shell forks once, before the bomb holds any pid (calling `bomb` directly
    # forks twice, and the second fork can already fail: dash then exits 2), and
    # `exec sleep` needs no fork, so the shell's group outlives the bomb's start and
    # the timeout kills all of it; the exec ends once the group is gone and reaped,
    # so its pids are free for the next exec.
    try:
        _, _, status = await sh(
            sandbox, "bomb() { bomb | bomb & }; bomb & exec sleep 30", timeout_s=5
        )
        assert status.timed_out, status
    except SandboxError as e:
        assert sandbox.backend is Backend.GVISOR, e
        assert "sandbox died" in str(e)
    if await sandbox_survived(sandbox):
        assert (await sandbox.stats()).pids <= 64
    else:
        assert sandbox.backend is Backend.GVISOR


async def test_memory_hog_is_killed_and_reported_as_oom(sandbox: Sandbox) -> None:
    # `tail` keeps the whole of an endless line in memory.
    _, _, status = await sh(sandbox, "tail /dev/zero", timeout_s=90)
    assert not status.timed_out
    assert status.oom_killed, status
    assert status.signal == 9
    survived = await sandbox_survived(sandbox)
    assert survived or sandbox.backend is Backend.GVISOR


async def test_no_network_unless_granted(sandbox: Sandbox) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        _, _, status = await sh(sandbox, f"echo hi | nc -w 2 127.0.0.1 {port}", timeout_s=20)
        assert not status.ok
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    out, _, _ = await sh(sandbox, "ip -o link 2>/dev/null | grep -v ' lo:' | wc -l")
    assert out.strip() == b"0"


async def test_network_when_granted_is_its_own(runtime: Runtime, base_rootfs: Path) -> None:
    """`network=True` gives the sandbox its own namespace with a link to the host
    (tests/test_sandbox_network.py checks what it reaches): the host's loopback stays
    out of reach."""
    sb = await runtime.create(spec_for(base_rootfs, "net", network=True))
    await sb.start()
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            _, _, status = await sh(sb, f"echo hi | nc -w 2 127.0.0.1 {port}", timeout_s=20)
            assert not status.ok
            listener.settimeout(0.2)
            with pytest.raises(TimeoutError):
                listener.accept()
        out, _, _ = await sh(sb, "ip -o -4 addr show dev eth0")
        assert b"inet " in out
    finally:
        await sb.kill()


async def test_logs_follow_delivers_output_as_produced(sandbox: Sandbox) -> None:
    background = await sandbox.exec(
        ExecRequest(shell="echo one; sleep 0.5; echo two; sleep 60", background=True)
    )
    got = bytearray()
    first = anyio.Event()
    with anyio.fail_after(20):
        async for entry in sandbox.logs(follow=True):
            got += entry.data
            if got == b"one\n":
                first.set()
                # "two" is not printed yet: the first line arrived as it was produced.
                assert b"two" not in got
            if b"two\n" in got:
                break
    assert first.is_set()
    await background.kill()


async def test_stats_report_the_cgroup(sandbox: Sandbox) -> None:
    stats = await sandbox.stats()
    assert stats.memory_bytes > 0
    if os.geteuid() == 0:
        assert stats.memory_limit_bytes == 128 << 20


async def test_jail_refuses_snapshots(runtime: Runtime, base_rootfs: Path) -> None:
    if runtime.backend is not Backend.JAIL:
        pytest.skip("gvisor snapshots are tested below")
    sb = await runtime.create(spec_for(base_rootfs, "nosnap"))
    with pytest.raises(NotSupportedError, match="jail backend does not support snapshots"):
        await sb.snapshot(Path("/nonexistent"))
    await sb.kill()


async def test_gvisor_checkpoint_restore_keeps_a_counter_going(
    runtime: Runtime, base_rootfs: Path, tmp_path: Path
) -> None:
    if runtime.backend is not Backend.GVISOR:
        pytest.skip("only gvisor checkpoints")
    sb = await runtime.create(spec_for(base_rootfs, "counter"))
    await sb.start()
    try:
        await sb.exec(
            ExecRequest(
                # Renamed into place: a read never sees the file truncated mid-write.
                shell="i=0; while true; do i=$((i+1)); echo $i > /tmp/c; mv /tmp/c /tmp/count;"
                " sleep 0.05; done",
                background=True,
            )
        )
        await anyio.sleep(0.5)
        snap = await sb.snapshot(tmp_path / "snap")
        at_snapshot = int(await sb.read_file("/tmp/count"))
    finally:
        await sb.kill()
    assert snap.size_bytes > 0
    restored = await runtime.restore(snap, spec_for(base_rootfs, "counter2"))
    try:

        async def count() -> int:
            return int(await restored.read_file("/tmp/count"))

        first = await count()
        second = await moved_past(count, first, timeout_s=60)
    finally:
        await restored.kill()
    assert first >= at_snapshot - 5  # continued from the checkpoint, not from 1
    assert second > first  # and it keeps counting
    await assert_no_leftovers(restored, runtime, tmp_path / "state")


async def test_gvisor_agent_link_survives_twenty_snapshots_in_place(
    runtime: Runtime, base_rootfs: Path, tmp_path: Path
) -> None:
    """The agent dials the host again after every checkpoint: twenty snapshots in a row,
    each resumed from its own image, and after each the sandbox answers and a background
    counter has carried on from where it was."""
    if runtime.backend is not Backend.GVISOR:
        pytest.skip("only gvisor checkpoints")
    sb = await runtime.create(spec_for(base_rootfs, "again"))
    await sb.start()
    try:
        await sb.exec(
            ExecRequest(
                shell="i=0; while true; do i=$((i+1)); echo $i > /tmp/c; mv /tmp/c /tmp/count;"
                " sleep 0.01; done",
                background=True,
            )
        )
        last = 0
        for round_ in range(20):
            # A stream still open at the checkpoint ends; the next snapshot waits for it
            # no longer than it takes the agent to hang up.
            pending = await sb.exec(ExecRequest(argv=["sleep", "30"]))
            await sb.snapshot(tmp_path / f"snap{round_}")
            with pytest.raises(SandboxError):
                await pending.wait()
            result = await (await sb.exec(ExecRequest(argv=["echo", f"round {round_}"]))).wait()
            assert result.stdout == f"round {round_}\n".encode()
            count = int(await sb.read_file("/tmp/count"))
            assert count >= last
            last = count
        assert last > 20
    finally:
        await sb.kill()


async def test_gvisor_sandbox_reaches_no_host_socket(sandbox: Sandbox) -> None:
    """The host listens for the agent only until it dials: afterwards the directory it
    dials through is empty, and no user but root may look into it."""
    if sandbox.backend is not Backend.GVISOR:
        pytest.skip("only gvisor dials the host")
    out, _, status = await sh(sandbox, "ls -A /.tartarus")
    assert (out, status.code) == (b"tartarus-agent\n", 0)
    _, err, status = await sh(sandbox, "ls /.tartarus", user="nobody")
    assert status.code != 0 and b"denied" in err.lower()


async def test_reap_removes_what_a_crashed_server_left(
    runtime: Runtime, base_rootfs: Path, tmp_path: Path
) -> None:
    keep = await runtime.create(spec_for(base_rootfs, "keep"))
    lost = await runtime.create(spec_for(base_rootfs, "lost"))
    await lost.start()
    # The server "crashes": it forgets `lost` without stopping it.
    removed = await runtime.reap({"keep"})
    assert removed == ["lost"]
    await assert_no_leftovers(lost, runtime, tmp_path / "state")
    await lost.kill()  # releases our handle on the (already dead) supervisor
    await keep.kill()


async def test_reap_finds_a_jail_whose_start_its_host_never_saw(
    base_rootfs: Path, tmp_path: Path, doctor_report: DoctorReport
) -> None:
    """The host died between spawning `tartarus-jail` and reading its `started` event
    (no started.json): reap finds the jail through its supervisor and the cgroup its
    config names, and kills it."""
    if not doctor_report.backend("jail").available:
        pytest.skip(f"jail cannot run here: {doctor_report.backend('jail').reason}")
    runtime = JailRuntime(tmp_path / "state")
    lost = await runtime.create(spec_for(base_rootfs, "unseen"))
    await lost.start()
    assert isinstance(lost, JailSandbox)
    (lost._dir / "started.json").unlink()
    assert await JailRuntime(tmp_path / "state").reap(set()) == ["unseen"]
    await anyio.to_thread.run_sync(assert_gone, lost, tmp_path / "state")
    await lost.kill()  # releases our handle on the (already dead) supervisor
    runtime.remove_cgroup_scope()
