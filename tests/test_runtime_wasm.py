"""The wasm backend against real wasmtime, with a hand-written WASI test program."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tartarus.runtime.base import NotSupportedError
from tartarus.runtime.hostfs import HostFileError
from tartarus.runtime.types import ExecRequest, OutputChunk, Resources, SandboxSpec
from tartarus.runtime.wasm import WasmRuntime, WasmSandbox
from tests.conftest import REPO_ROOT
from tests.runtime_checks import expected_flood
from tests.support.backends import started

TOOLBOX = REPO_ROOT / "tests" / "wasm" / "toolbox.wat"

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[WasmSandbox]:
    runtime = WasmRuntime(tmp_path / "state")
    spec = SandboxSpec(id="w1", wasm_module=TOOLBOX, resources=Resources(memory_mib=64))
    async with started(await runtime.create(spec)) as sb:
        yield sb
    assert not (tmp_path / "state" / "wasm" / "w1").exists()


def tool(*args: str, **kw: object) -> ExecRequest:
    return ExecRequest(argv=["toolbox", *args], **kw)  # type: ignore[arg-type]


async def test_echo(sandbox: WasmSandbox) -> None:
    result = await (await sandbox.exec(tool("echo", "hello", "world"))).wait()
    assert result.stdout == b"hello world\n"
    assert result.exit.code == 0


async def test_failing_command_keeps_exit_code(sandbox: WasmSandbox) -> None:
    result = await (await sandbox.exec(tool("exit", "3"))).wait()
    assert result.exit.code == 3
    assert not result.exit.ok


async def test_timeout_kills_a_spinning_module(sandbox: WasmSandbox) -> None:
    result = await (await sandbox.exec(tool("spin", timeout_s=0.3))).wait()
    assert result.exit.timed_out
    assert result.exit.code is None
    assert result.exit.signal == 9


async def test_kill_stops_one_exec_only(sandbox: WasmSandbox) -> None:
    spinning = await sandbox.exec(tool("spin"))
    other = await sandbox.exec(tool("spin", timeout_s=30))
    await spinning.kill()
    assert (await spinning.wait()).exit.signal == 9
    assert (await sandbox.processes())[1].running
    await other.kill(15)
    assert (await other.wait()).exit.signal == 15


async def test_stdin_round_trip(sandbox: WasmSandbox) -> None:
    execution = await sandbox.exec(tool("cat", stdin=True))
    payload = b"".join(b"line %d\n" % i for i in range(5000))
    await execution.write_stdin(payload)
    await execution.close_stdin()
    result = await execution.wait()
    assert result.stdout == payload
    assert result.exit.code == 0


async def test_stdin_closed_before_the_module_starts(sandbox: WasmSandbox) -> None:
    """Writing and closing stdin at once must not lose the data or hang the module, even
    when its thread starts late."""
    results = []
    for _ in range(20):
        execution = await sandbox.exec(tool("cat", stdin=True))
        await execution.write_stdin(b"quick\n")
        await execution.close_stdin()
        results.append((await execution.wait()).stdout)
    assert results == [b"quick\n"] * 20


async def test_ten_megabytes_stream_in_order(sandbox: WasmSandbox) -> None:
    size = 10 << 20
    execution = await sandbox.exec(tool("flood", str(size)))
    received = bytearray()
    seqs = []
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            seqs.append(event.seq)
            received += event.data
        else:
            assert event.code == 0
            assert event.dropped_chunks == 0
    assert seqs == list(range(len(seqs)))
    assert bytes(received) == expected_flood(size)


async def test_file_round_trip_both_ways(sandbox: WasmSandbox) -> None:
    await sandbox.write_file("/in.txt", b"from the host\n")
    result = await (await sandbox.exec(tool("readfile", "in.txt"))).wait()
    assert result.stdout == b"from the host\n"
    result = await (await sandbox.exec(tool("writefile", "out.txt", "from wasm"))).wait()
    assert result.exit.code == 0
    assert await sandbox.read_file("/out.txt") == b"from wasm"
    assert {f.name for f in await sandbox.list_dir("/")} == {"in.txt", "out.txt"}
    await sandbox.make_dir("/a/b")
    await sandbox.rename("/out.txt", "/a/b/moved.txt")
    assert (await sandbox.stat("/a/b/moved.txt")).size == 9
    await sandbox.remove("/a", recursive=True)
    assert [f.name for f in await sandbox.list_dir("/")] == ["in.txt"]


async def test_twenty_concurrent_execs(sandbox: WasmSandbox) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        results[i] = (await (await sandbox.exec(tool("echo", f"n{i}"))).wait()).stdout

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)
    assert results == {i: f"n{i}\n".encode() for i in range(20)}


async def test_ten_sandboxes_at_once(tmp_path: Path) -> None:
    runtime = WasmRuntime(tmp_path)
    outputs: dict[int, bytes] = {}

    async def one(i: int) -> None:
        sb = await runtime.create(SandboxSpec(id=f"s{i}", wasm_module=TOOLBOX))
        await sb.start()
        try:
            outputs[i] = (await (await sb.exec(tool("echo", str(i)))).wait()).stdout
        finally:
            await sb.kill()

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(one, i)
    assert outputs == {i: f"{i}\n".encode() for i in range(10)}
    assert list((tmp_path / "wasm").iterdir()) == []


async def test_sandboxes_of_one_module_share_its_compile_and_kills_stay_in_their_sandbox(
    tmp_path: Path,
) -> None:
    runtime = WasmRuntime(tmp_path)
    a = await runtime.create(SandboxSpec(id="share-a", wasm_module=TOOLBOX))
    b = await runtime.create(SandboxSpec(id="share-b", wasm_module=TOOLBOX))
    async with started(a), started(b):
        spinning = await b.exec(tool("spin"))
        # A's execs end and give their engines back to the pool B's spin came from;
        # interrupting them (and then all of A) must never reach B's running exec.
        for i in range(30):
            done = await a.exec(tool("echo", str(i)))
            assert (await done.wait()).stdout == f"{i}\n".encode()
            await done.kill()
        await a.kill()
        assert (await b.processes())[0].running
        await spinning.kill(15)
        assert (await spinning.wait()).exit.signal == 15


async def test_a_module_file_replaced_in_place_is_compiled_again(tmp_path: Path) -> None:
    module = tmp_path / "tool.wat"
    module.write_bytes(TOOLBOX.read_bytes())
    runtime = WasmRuntime(tmp_path / "state")

    async def echo(sandbox_id: str) -> bytes:
        async with started(
            await runtime.create(SandboxSpec(id=sandbox_id, wasm_module=module))
        ) as sb:
            return (await (await sb.exec(tool("echo", sandbox_id))).wait()).stdout

    assert await echo("first") == b"first\n"
    assert await echo("cached") == b"cached\n"
    module.write_bytes(b"\0asm garbage")  # a new file: its compile fails, as it must
    broken = await runtime.create(SandboxSpec(id="broken", wasm_module=module))
    with pytest.raises(Exception, match="cannot compile"):
        await broken.start()
    await broken.kill()
    module.write_bytes(TOOLBOX.read_bytes())
    assert await echo("again") == b"again\n"


async def test_host_files_are_out_of_reach(sandbox: WasmSandbox, tmp_path: Path) -> None:
    for path in ("/etc/shadow", "../../../../etc/shadow", "../../state"):
        result = await (await sandbox.exec(tool("readfile", path))).wait()
        assert result.exit.code == 1, path
        assert b"root:" not in result.stdout
    result = await (await sandbox.exec(tool("writefile", "../escaped", "x"))).wait()
    assert result.exit.code == 1
    assert not (tmp_path / "state" / "wasm" / "escaped").exists()
    with pytest.raises(HostFileError, match=r"No such file"):
        await sandbox.read_file("/../../etc/shadow")


async def test_memory_hog_is_stopped_and_reported_as_oom(sandbox: WasmSandbox) -> None:
    result = await (await sandbox.exec(tool("grow"))).wait()
    assert result.exit.oom_killed
    assert b"memory limit" in result.stderr


async def test_no_network(sandbox: WasmSandbox) -> None:
    result = await (await sandbox.exec(tool("net"))).wait()
    assert result.exit.code == 0


async def test_logs_follow_delivers_output_as_produced(sandbox: WasmSandbox) -> None:
    seen = bytearray()
    first_line = anyio.Event()

    async def follow() -> None:
        async for entry in sandbox.logs(follow=True):
            seen.extend(entry.data)
            if seen.endswith(b"\n"):
                first_line.set()
            if seen.endswith(b"second\n"):
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await (await sandbox.exec(tool("echo", "first"))).wait()
        with anyio.fail_after(10):
            await first_line.wait()
        # Delivered while the sandbox is still running, before the next output exists.
        assert seen == b"first\n"
        await (await sandbox.exec(tool("stderr", "second"))).wait()
    assert seen == b"first\nsecond\n"
    history = b"".join([e.data async for e in sandbox.logs()])
    assert history == seen


async def test_unsupported_requests_say_so(sandbox: WasmSandbox) -> None:
    with pytest.raises(NotSupportedError, match="wasm backend does not support shell"):
        await sandbox.exec(ExecRequest(shell="echo hi"))
    with pytest.raises(NotSupportedError, match="snapshots"):
        await sandbox.snapshot(Path("/nonexistent"))


async def test_bad_module_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm garbage")
    sb = await WasmRuntime(tmp_path).create(SandboxSpec(id="bad", wasm_module=bad))
    with pytest.raises(Exception, match="cannot compile"):
        await sb.start()
    await sb.kill()


async def test_reap_removes_leftovers(tmp_path: Path) -> None:
    runtime = WasmRuntime(tmp_path)
    for name in ("keep", "gone"):
        await runtime.create(SandboxSpec(id=name, wasm_module=TOOLBOX))
    assert await runtime.reap({"keep"}) == ["gone"]
    assert [p.name for p in (tmp_path / "wasm").iterdir()] == ["keep"]
