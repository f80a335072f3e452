"""The real agent binary, run on the host in a tmp dir and driven by the Python client:
exec, stdin, PTY, timeouts, background processes, bounded buffers, logs and files."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tartarus.binaries import find_binary
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient, AgentConnectionError, AgentError
from tartarus.runtime.agent_dial_in import AgentDialIn
from tartarus.runtime.agent_sandbox import AgentExecution
from tartarus.runtime.types import ExecRequest, ExitStatus, FileKind, OutputChunk, PtySize
from tests.support.agent import HostAgentSandbox, running_agent

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[HostAgentSandbox]:
    with running_agent(tmp_path) as (proc, socket):
        sb = HostAgentSandbox(socket)
        await sb.start()
        try:
            yield sb
        finally:
            await sb.close_agent()
        assert proc.poll() is None, "the agent must survive everything a test did"


async def run(sb: HostAgentSandbox, shell: str, **kw: object) -> tuple[bytes, bytes, ExitStatus]:
    execution = await sb.exec(ExecRequest(shell=shell, **kw))  # type: ignore[arg-type]
    result = await execution.wait()
    return result.stdout, result.stderr, result.exit


async def test_echo(sandbox: HostAgentSandbox) -> None:
    execution = await sandbox.exec(ExecRequest(argv=["echo", "hello", "world"]))
    result = await execution.wait()
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.exit.code == 0 and result.exit.ok
    assert result.exit.pid == execution.pid


async def test_failing_command_keeps_its_exit_code(sandbox: HostAgentSandbox) -> None:
    out, err, status = await run(sandbox, "echo oops >&2; exit 42")
    assert (out, err, status.code, status.signal) == (b"", b"oops\n", 42, None)


async def test_env_cwd_and_shell(sandbox: HostAgentSandbox, tmp_path: Path) -> None:
    out, _, status = await run(sandbox, 'echo "$GREETING" && pwd', env={"GREETING": "hi"}, cwd="/")
    assert out == b"hi\n/\n" and status.ok


async def test_missing_program_is_a_clear_error(sandbox: HostAgentSandbox) -> None:
    with pytest.raises(AgentError) as info:
        await sandbox.exec(ExecRequest(argv=["/nonexistent/program"]))
    assert info.value.code == "not_found"
    assert "/nonexistent/program" in str(info.value)
    with pytest.raises(AgentError) as info:
        await sandbox.exec(ExecRequest(argv=["true"], cwd="/no/such/dir"))
    assert info.value.code == "not_found"
    with pytest.raises(AgentError) as info:
        await sandbox.exec(ExecRequest())
    assert info.value.code == "invalid_argument"


async def test_timeout_kills_the_process_group(sandbox: HostAgentSandbox, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    # The grandchild would touch the marker if the group were not killed.
    _, _, status = await run(sandbox, f"(sleep 2; touch {marker}) & sleep 30", timeout_s=0.5)
    assert status.timed_out
    assert status.signal == signal.SIGKILL and status.code is None
    await anyio.sleep(2.5)
    assert not marker.exists()


async def test_stdin_round_trip(sandbox: HostAgentSandbox) -> None:
    execution = await sandbox.exec(ExecRequest(argv=["cat"], stdin=True))
    payload = os.urandom(3 << 20)  # several chunks, more than a pipe holds
    async with anyio.create_task_group() as tg:
        result_box: list[bytes] = []

        async def collect() -> None:
            result_box.append((await execution.wait()).stdout)

        tg.start_soon(collect)
        await execution.write_stdin(payload[:10])
        await execution.write_stdin(payload[10:])
        await execution.close_stdin()
    assert result_box[0] == payload


async def test_ten_megabytes_streamed_in_order_without_loss(sandbox: HostAgentSandbox) -> None:
    # 10 MB of numbered lines: order and completeness are both checkable.
    script = "i=0; while [ $i -lt 131072 ]; do printf '%079d\\n' $i; i=$((i+1)); done"
    execution = await sandbox.exec(ExecRequest(shell=script))
    received = bytearray()
    last_seq = 0
    status: ExitStatus | None = None
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            assert event.seq == last_seq + 1, "sequence numbers have no gaps"
            last_seq = event.seq
            received += event.data
        else:
            status = event
    assert status is not None and status.ok and status.dropped_chunks == 0
    lines = bytes(received).split(b"\n")[:-1]
    assert len(received) == 131072 * 80 and len(lines) == 131072
    assert all(int(line) == i for i, line in enumerate(lines))


async def test_twenty_concurrent_execs(sandbox: HostAgentSandbox) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        out, _, status = await run(sandbox, f"sleep 0.2; echo {i}; exit {i % 3}")
        assert status.code == i % 3
        results[i] = out

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert results == {i: f"{i}\n".encode() for i in range(20)}


async def test_pty_and_resize(sandbox: HostAgentSandbox) -> None:
    execution = await sandbox.exec(
        ExecRequest(
            shell="stty size; read line; stty size; echo got:$line",
            pty=PtySize(rows=24, cols=80),
        )
    )
    assert isinstance(execution, AgentExecution) and execution.pty
    seen = bytearray()
    events = execution.events()
    async for event in events:
        assert isinstance(event, OutputChunk)
        seen += event.data
        if b"24 80" in seen:
            break
    await execution.resize(50, 132)
    await execution.write_stdin(b"hello\n")
    status: ExitStatus | None = None
    async for event in events:
        if isinstance(event, OutputChunk):
            assert event.stream == "stdout"  # a terminal has one stream
            seen += event.data
        else:
            status = event
    assert status is not None and status.ok
    assert b"50 132" in seen and b"got:hello" in seen


async def test_background_process_list_reattach_kill(tmp_path: Path) -> None:
    with running_agent(tmp_path) as (_, socket):
        first = HostAgentSandbox(socket)
        await first.start()
        execution = await first.exec(
            ExecRequest(shell="echo started; exec sleep 60", background=True)
        )
        pid = execution.pid
        async for event in execution.events():
            assert isinstance(event, OutputChunk) and event.data == b"started\n"
            break
        # The connection that started it goes away; a background process survives.
        await first.close_agent()

        second = HostAgentSandbox(socket)
        await second.start()
        listed = {proc.pid: proc for proc in await second.processes()}
        assert listed[pid].running and listed[pid].argv[-1] == "echo started; exec sleep 60"

        attached = await second.attach(pid)
        events = attached.events()
        first_event = await events.__anext__()
        assert isinstance(first_event, OutputChunk) and first_event.data == b"started\n"
        assert first_event.seq == 1  # replayed from the buffer

        await second.kill_process(pid, signal.SIGTERM)
        rest = [event async for event in events]
        assert isinstance(rest[-1], ExitStatus) and rest[-1].signal == signal.SIGTERM
        listed = {proc.pid: proc for proc in await second.processes()}
        assert not listed[pid].running and listed[pid].exit is not None
        with pytest.raises(AgentError) as info:
            await second.kill_process(pid)
        assert info.value.code == "no_such_process"
        await second.close_agent()


async def test_foreground_process_dies_with_its_connection(tmp_path: Path) -> None:
    with running_agent(tmp_path) as (_, socket):
        first = HostAgentSandbox(socket)
        await first.start()
        execution = await first.exec(ExecRequest(argv=["sleep", "60"]))
        await first.close_agent()
        second = HostAgentSandbox(socket)
        await second.start()
        with anyio.fail_after(10):
            while True:
                procs = {proc.pid: proc for proc in await second.processes()}
                if not procs[execution.pid].running:
                    break
                await anyio.sleep(0.05)
        exit_ = procs[execution.pid].exit
        assert exit_ is not None and exit_.signal == signal.SIGKILL
        await second.close_agent()


async def test_bounded_buffer_drops_and_counts_when_nobody_reads(
    sandbox: HostAgentSandbox,
) -> None:
    # 4 MiB of output into a 64 KiB buffer, with nobody reading until it has exited.
    client = sandbox.agent
    stream = await client.start(
        p.Exec(shell="head -c 4194304 /dev/zero", background=True, buffer_bytes=65536)
    )
    started = await stream.reply()
    assert isinstance(started, p.Started)
    stream.close()  # stop listening on this connection: nothing is read
    with anyio.fail_after(30):
        while True:
            info = {proc.pid: proc for proc in await sandbox.processes()}[started.pid]
            if not info.running:
                break
            await anyio.sleep(0.05)
    assert info.exit is not None and info.exit.ok  # the child was never blocked

    attached = await sandbox.attach(started.pid)
    result = await attached.wait()
    status = result.exit
    assert status.dropped_chunks > 0
    assert len(result.stdout) <= 65536  # only the buffer's worth was kept
    listed = (await client.call_expect(p.ListProcesses(), p.ProcessList)).processes
    proc = next(x for x in listed if x.pid == started.pid)
    # Every chunk is accounted for: delivered + dropped == produced.
    delivered = proc.last_seq - status.dropped_chunks
    assert delivered > 0 and proc.evicted_chunks == status.dropped_chunks


async def test_logs_replay_and_follow(sandbox: HostAgentSandbox) -> None:
    await run(sandbox, "echo one; echo two >&2")
    entries = [entry async for entry in sandbox.logs()]
    assert b"".join(e.data for e in entries if e.stream == "stdout") == b"one\n"
    assert b"".join(e.data for e in entries if e.stream == "stderr") == b"two\n"
    last = entries[-1].seq
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)

    follower = sandbox.logs(follow=True, since_seq=last)
    execution = await sandbox.exec(ExecRequest(shell="echo three"))
    with anyio.fail_after(10):
        entry = await follower.__anext__()
    assert entry.data == b"three\n" and entry.seq == last + 1
    await follower.aclose()
    await execution.wait()


async def test_run_as_another_user(sandbox: HostAgentSandbox) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"switching users needs root (euid is {os.geteuid()})")
    out, _, status = await run(sandbox, "id -u; id -g", user="65534:65533")
    assert status.ok and out == b"65534\n65533\n"
    out, _, status = await run(sandbox, "id -un", user="nobody")
    assert status.ok and out == b"nobody\n"
    with pytest.raises(AgentError) as info:
        await sandbox.exec(ExecRequest(argv=["true"], user="no-such-user-here"))
    assert info.value.code == "invalid_argument" and "no-such-user-here" in str(info.value)


async def test_file_round_trips(sandbox: HostAgentSandbox, tmp_path: Path) -> None:
    root = tmp_path / "files"
    small = str(root / "a" / "b.txt")
    await sandbox.write_file(small, b"hello", mode=0o600)
    assert await sandbox.read_file(small) == b"hello"
    info = await sandbox.stat(small)
    assert info.kind == FileKind.FILE and info.size == 5 and info.mode & 0o777 == 0o600

    big = os.urandom(20 << 20)  # streamed in chunks, both ways
    await sandbox.write_file(str(root / "big.bin"), big)
    assert (root / "big.bin").read_bytes() == big
    chunks = [chunk async for chunk in sandbox.download(str(root / "big.bin"))]
    assert b"".join(chunks) == big and len(chunks) > 1
    assert await sandbox.read_file(str(root / "big.bin")) == big
    with pytest.raises(AgentError) as info_err:
        await sandbox.read_file(str(root / "big.bin"), max_bytes=1 << 20)
    assert info_err.value.code == "too_large"

    await sandbox.make_dir(str(root / "x" / "y"))
    await sandbox.rename(small, str(root / "x" / "y" / "moved.txt"))
    names = [entry.name for entry in await sandbox.list_dir(str(root))]
    assert names == ["a", "big.bin", "x"]
    assert (await sandbox.stat(str(root / "x"))).kind == FileKind.DIR
    with pytest.raises(AgentError) as info_err:
        await sandbox.remove(str(root / "x"))
    assert info_err.value.code == "not_empty"
    await sandbox.remove(str(root / "x"), recursive=True)
    with pytest.raises(AgentError) as info_err:
        await sandbox.read_file(str(root / "x" / "y" / "moved.txt"))
    assert info_err.value.code == "not_found"
    # No temporary files are left behind by the atomic writes.
    assert sorted([path.name async for path in anyio.Path(root).iterdir()]) == ["a", "big.bin"]


async def test_upload_is_atomic_and_abandoned_uploads_leave_nothing(
    sandbox: HostAgentSandbox, tmp_path: Path
) -> None:
    target = tmp_path / "up.bin"
    target.write_bytes(b"old")

    async def failing_source() -> AsyncIterator[bytes]:
        yield os.urandom(2 << 20)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError):
        await sandbox.upload(str(target), failing_source())
    assert target.read_bytes() == b"old"
    assert sorted([path.name async for path in anyio.Path(tmp_path).iterdir()]) == [
        "agent.sock",
        "agent.stderr",
        "up.bin",
    ]

    async def good_source() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([i]) * (700 << 10)

    size = await sandbox.upload(str(target), good_source(), mode=0o640)
    assert size == 5 * (700 << 10)
    assert target.read_bytes() == b"".join(bytes([i]) * (700 << 10) for i in range(5))


async def test_stats(sandbox: HostAgentSandbox) -> None:
    stats = await sandbox.stats()
    assert stats.pids >= 1 and stats.memory_bytes > 0


async def test_agent_over_stdio(tmp_path: Path) -> None:
    client = await AgentClient.spawn([find_binary("tartarus-agent"), "serve", "--listen", "stdio"])
    async with client:
        assert client.hello is not None and client.hello.version == p.PROTOCOL_VERSION
        stream = await client.start(p.Exec(argv=["echo", "via stdio"]))
        assert isinstance(await stream.next(), p.Started)
        output = await stream.next()
        assert isinstance(output, p.Output) and output.data == b"via stdio\n"
        assert isinstance(await stream.next(), p.Exit)
    assert client._process is None  # aclose reaped the agent


async def test_shutdown_terminates_processes_and_exits(tmp_path: Path) -> None:
    with running_agent(tmp_path) as (proc, socket):
        sb = HostAgentSandbox(socket)
        await sb.start()
        execution = await sb.exec(ExecRequest(shell="trap 'exit 7' TERM; sleep 60 & wait"))
        await anyio.sleep(0.2)
        await sb.stop(grace_s=5)
        assert await anyio.to_thread.run_sync(proc.wait, 10) == 0
        del execution


async def test_dialling_agent_comes_back_after_each_hang_up(tmp_path: Path) -> None:
    """`--listen dial:PATH` (gVisor's link): the agent dials a host socket that does
    not exist yet, and again whenever the host hangs up; a background process outlives
    the connection that started it, a foreground one does not."""
    door = AgentDialIn(tmp_path / "door" / "a.s")
    door.path.parent.mkdir(parents=True)
    agent = await anyio.open_process(
        [find_binary("tartarus-agent"), "serve", "--listen", f"dial:{door.path}"],
        cwd=tmp_path,
    )
    try:
        await anyio.sleep(0.1)  # it is retrying by now
        client = await door.accept()
        assert not door.path.exists()  # nothing to dial while connected
        await client.call(p.Exec(argv=["sleep", "60"], background=True))
        await client.start(p.Exec(argv=["sleep", "61"]))
        for _ in range(3):
            assert await client.hang_up()
            client = await door.accept()
            listed = await client.call_expect(p.ListProcesses(), p.ProcessList)
            running = [proc.argv for proc in listed.processes if proc.running]
            assert running == [["sleep", "60"]]
        await client.aclose()
    finally:
        await door.close()
        agent.kill()
        await agent.wait()


async def test_dial_in_times_out_with_a_clear_error(tmp_path: Path) -> None:
    door = AgentDialIn(tmp_path / "a.sock")
    with pytest.raises(AgentConnectionError, match=r"did not connect to .*a\.sock within 0\.2 s"):
        await door.accept(timeout_s=0.2)
    assert not door.path.exists()
