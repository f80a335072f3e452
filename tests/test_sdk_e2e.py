"""The async and sync SDK end to end: a real `tartarus serve` with a real backend (jail
or gVisor, whichever runs here), every SDK call, and bad input through the SDK."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from tartarus import Sandbox
from tartarus.api.types import FileWatchEvent
from tartarus.node.code_contexts import MAX_CONTEXTS
from tartarus.runtime.types import FileKind, SandboxState
from tartarus.sdk.client import Client
from tartarus.sdk.errors import ConflictError, InvalidRequestError, NotFoundError
from tartarus.sync import Sandbox as SyncSandbox
from tests.support.server import (
    Server,
    processes_mentioning,
    require_backend,
    running_server,
    server_env,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.anyio]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def backend() -> str:
    return require_backend()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("sdk")
    # node too: test_javascript_runs_in_the_node_template.
    env = server_env(base, seed_templates=("base", "python", "node"))
    with running_server(base, env=env) as s:
        yield s
    assert processes_mentioning(str(base)) == []


@pytest.fixture
async def sb(server: Server, backend: str) -> AsyncIterator[Sandbox]:
    async with Sandbox.create(backend=backend, url=server.url, timeout=120) as box:
        yield box


async def test_create_info_list_connect_kill(server: Server, backend: str) -> None:
    sb = await Sandbox.create(
        backend=backend, url=server.url, timeout=60, metadata={"suite": "sdk", "n": "1"}
    )
    try:
        assert sb.id.startswith("sb-")
        assert sb.info.state is SandboxState.RUNNING
        assert sb.info.backend.value == backend
        assert sb.info.backend_reason
        listed = await Sandbox.list(url=server.url, metadata={"suite": "sdk", "n": "1"})
        assert [i.id for i in listed] == [sb.id]
        again = await Sandbox.connect(sb.id, url=server.url)
        assert again.info.metadata == {"suite": "sdk", "n": "1"}
        before = again.info.expires_at
        await again.set_timeout(600)
        assert again.info.expires_at is not None and before is not None
        assert again.info.expires_at > before
        await again.close()
        assert await sb.is_running()
    finally:
        await sb.kill()
    async with await Client.connect(server.url) as client:
        gone = await Sandbox.connect(sb.id, client=client)
        assert gone.info.state is SandboxState.STOPPED
        assert gone.info.detail == "deleted"
        assert not await gone.is_running()
        with pytest.raises(ConflictError, match="stopped"):
            await gone.commands.run("true")


async def test_context_manager_kills(server: Server, backend: str) -> None:
    async with Sandbox.create(backend=backend, url=server.url) as box:
        sandbox_id = box.id
    async with await Client.connect(server.url) as client:
        info = (await Sandbox.connect(sandbox_id, client=client)).info
        assert info.state is SandboxState.STOPPED


async def test_run_foreground(sb: Sandbox) -> None:
    r = await sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 3)
    assert r.error == "exited with code 3"
    r = await sb.commands.run(
        ["sh", "-c", 'echo "$GREETING from $(pwd)"'], envs={"GREETING": "hi"}, cwd="/tmp"
    )
    assert r.stdout == "hi from /tmp\n"
    r = await sb.commands.run("cat", stdin="fed through stdin")
    assert r.stdout == "fed through stdin"
    r = await sb.commands.run("sleep 30", timeout=1)
    assert r.timed_out
    assert r.error == "timed out"


async def test_run_streams_to_callbacks(sb: Sandbox) -> None:
    seen: list[str] = []
    errs: list[str] = []
    r = await sb.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 0.1; done; echo bad >&2",
        on_stdout=seen.append,
        on_stderr=errs.append,
    )
    assert "".join(seen) == "line1\nline2\nline3\n" == r.stdout
    assert "".join(errs) == "bad\n"
    assert r.exit_code == 0


async def test_background_handle(sb: Sandbox) -> None:
    handle = await sb.commands.run("cat; echo done", background=True)
    await handle.send_stdin("one\n")
    await handle.send_stdin(b"two\n")
    await handle.close_stdin()
    result = await handle.wait()
    assert result.stdout == "one\ntwo\ndone\n"
    assert result.exit_code == 0
    sleeper = await sb.commands.run("sleep 600", background=True)
    assert sleeper.pid in [p.pid for p in await sb.commands.list() if p.running]
    await sleeper.kill()
    killed = await sleeper.wait()
    assert killed.signal == 9
    # Another client picks a running command up by pid and sees its output so far.
    ticker = await sb.commands.run("echo first; sleep 600", background=True)
    got = anyio.Event()
    text: list[str] = []

    def collect(data: str) -> None:
        text.append(data)
        if "first" in "".join(text):
            got.set()

    other = sb.commands.connect(ticker.pid, on_stdout=collect)
    async with anyio.create_task_group() as tg:
        tg.start_soon(other.wait)
        with anyio.fail_after(30):
            await got.wait()
        await sb.commands.kill(ticker.pid)


async def test_files(sb: Sandbox, tmp_path: Path) -> None:
    written = await sb.files.write("/tmp/hello.txt", "héllo")
    assert written.size == len("héllo".encode())
    assert await sb.files.read("/tmp/hello.txt") == "héllo"
    blob = bytes(range(256)) * 4 + b"\xff\xfe\x00"
    await sb.files.write("/tmp/blob.bin", blob)
    assert await sb.files.read("/tmp/blob.bin", format="bytes") == blob
    assert await sb.files.make_dir("/tmp/a/b/c") is True
    assert await sb.files.make_dir("/tmp/a/b/c") is False
    names = {e.name: e.kind for e in await sb.files.list("/tmp")}
    assert names["hello.txt"] is FileKind.FILE
    assert names["a"] is FileKind.DIR
    moved = await sb.files.rename("/tmp/hello.txt", "/tmp/a/moved.txt")
    assert moved.size == written.size
    assert not await sb.files.exists("/tmp/hello.txt")
    assert await sb.files.exists("/tmp/a/moved.txt")
    await sb.files.remove("/tmp/a")
    assert not await sb.files.exists("/tmp/a")
    # Large files stream both ways without being held whole.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 << 20))
    up = await sb.files.upload(big, "/tmp/big.bin")
    assert up.size == 5 << 20
    back = tmp_path / "back.bin"
    assert await sb.files.download("/tmp/big.bin", back) == 5 << 20
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(big.read_bytes()).digest()
    r = await sb.commands.run("wc -c < /tmp/big.bin")
    assert r.stdout.strip() == str(5 << 20)


async def test_file_errors(sb: Sandbox) -> None:
    with pytest.raises(NotFoundError):
        await sb.files.read("/no/such/file")
    for bad in ["/tmp/../etc/passwd", "relative/path", "/tmp/\x00x"]:
        with pytest.raises(InvalidRequestError):
            await sb.files.read(bad)
        with pytest.raises(InvalidRequestError):
            await sb.files.write(bad, "x")
    with pytest.raises(ConflictError):
        await sb.files.remove("/")


async def test_watching_a_directory_reports_its_changes(sb: Sandbox) -> None:
    """Events come from inotify in the sandbox's agent, for the API's writes and for
    the sandbox's own processes alike."""
    await sb.files.make_dir("/tmp/w/old")
    seen: list[tuple[str, str]] = []
    async with sb.files.watch("/tmp/w", recursive=True) as changes:
        await sb.commands.run(
            "echo 1 > /tmp/w/a.txt; chmod 600 /tmp/w/a.txt; mv /tmp/w/a.txt /tmp/w/b.txt; "
            "echo 2 > /tmp/w/old/in-old; mkdir /tmp/w/new; echo 3 > /tmp/w/new/in-new; "
            "rm /tmp/w/b.txt"
        )
        await sb.files.write("/tmp/w/api.txt", "from the API")
        with anyio.fail_after(30):
            async for change in changes:
                seen.append((change.kind, change.path))
                if change.path == "/tmp/w/api.txt" and change.kind in ("rename", "create"):
                    break
    for expected in [
        ("create", "/tmp/w/a.txt"),
        ("write", "/tmp/w/a.txt"),
        ("chmod", "/tmp/w/a.txt"),
        # As inotify-based watchers (fsnotify, E2B's) name them: the old name is
        # renamed, the new one created.
        ("rename", "/tmp/w/a.txt"),
        ("create", "/tmp/w/b.txt"),
        ("create", "/tmp/w/old/in-old"),
        ("create", "/tmp/w/new"),
        ("create", "/tmp/w/new/in-new"),
        ("remove", "/tmp/w/b.txt"),
    ]:
        assert expected in seen, (expected, seen)
    # Not recursive: a subdirectory's changes are not reported; the callback form.
    got: list[str] = []
    top = anyio.Event()

    def on_event(event: FileWatchEvent) -> None:
        got.append(event.path)
        if event.path == "/tmp/w/top":
            top.set()

    handle = await sb.files.watch_dir("/tmp/w", on_event)
    await sb.commands.run("echo 4 > /tmp/w/old/deep; echo 5 > /tmp/w/top")
    with anyio.fail_after(30):
        await top.wait()
    await handle.stop()
    assert "/tmp/w/old/deep" not in got
    with pytest.raises(NotFoundError):
        async with sb.files.watch("/tmp/no-such-dir"):
            pass
    with pytest.raises(ConflictError, match="directory"):
        async with sb.files.watch("/tmp/w/top"):
            pass
    # A removed directory ends its watch.
    async with sb.files.watch("/tmp/w/new") as changes:
        await sb.files.remove("/tmp/w/new", recursive=True)
        with anyio.fail_after(30):
            ends = [(c.kind, c.path) async for c in changes]
    assert ends[-1] == ("remove", "/tmp/w/new")


async def test_pty(sb: Sandbox) -> None:
    term = await sb.pty.create(rows=30, cols=100)
    await sb.pty.resize(term.pid, 40, 120)
    await term.send_stdin("stty size; echo $((6*7)); exit 5\n")
    chunks: list[bytes] = []
    with anyio.fail_after(60):
        exit_info = await term.wait_output(chunks.append)
    text = b"".join(chunks).decode(errors="replace")
    assert "40 120" in text
    assert "42" in text
    assert exit_info.code == 5


async def test_logs(sb: Sandbox) -> None:
    await sb.commands.run("echo logged-line")
    page = await sb.logs()
    assert any("logged-line" in e.data for e in page.items)
    seqs = [e.seq for e in page.items]
    assert seqs == sorted(seqs) and seqs[0] >= 1
    rest = await sb.logs(since=page.next_seq)
    assert rest.items == []
    # Follow from the last seen entry: only what comes after it.
    followed: list[str] = []
    async with anyio.create_task_group() as tg:

        async def follow() -> None:
            async for entry in sb.follow_logs(since=page.next_seq):
                followed.append(entry.data)
                if "after-follow" in entry.data:
                    tg.cancel_scope.cancel()

        tg.start_soon(follow)
        await anyio.sleep(0.2)
        await sb.commands.run("echo after-follow")
        with anyio.fail_after(30):
            await anyio.sleep_forever()
    assert "logged-line" not in "".join(followed)


# A shell reading a string grows its buffer by doubling, so the peak is about twice the
# string: 32 MiB stays well inside the base template's 128 MiB limit under any load.
HOLD_MIB = 32


async def test_stats(sb: Sandbox) -> None:
    """A process that holds 32 MiB and spins shows up in the stats: memory up by most of
    it, CPU seconds growing, one process more. Every backend reports these (the jail and
    gVisor from the host cgroup, the others from the guest's /proc); none reports I/O."""
    before = await sb.stats()
    # The shell keeps the 32 MiB string in its own memory while it spins.
    workload = await sb.commands.run(
        f"x=$(head -c {HOLD_MIB << 20} /dev/zero | tr '\\0' x); while :; do :; done",
        background=True,
    )
    try:
        now = before
        with anyio.move_on_after(60):
            while (
                now.memory_bytes - before.memory_bytes < (HOLD_MIB - 8) << 20
                or now.cpu_seconds < before.cpu_seconds + 1
            ):
                await anyio.sleep(0.2)
                now = await sb.stats()
        assert now.memory_bytes - before.memory_bytes >= (HOLD_MIB - 8) << 20, (before, now)
        assert now.cpu_seconds >= before.cpu_seconds + 1, (before, now)
        assert now.pids > before.pids, (before, now)
        if now.memory_limit_bytes is not None:
            assert now.memory_limit_bytes >= now.memory_bytes, now
    finally:
        await workload.kill()


async def test_sandbox_dies_at_its_timeout(server: Server, backend: str) -> None:
    sb = await Sandbox.create(backend=backend, url=server.url, timeout=1)
    try:
        with anyio.fail_after(60):
            for _ in range(600):
                if (await sb.get_info()).state is not SandboxState.RUNNING:
                    break
                await anyio.sleep(0.2)
        assert sb.info.state is SandboxState.STOPPED
        assert sb.info.detail == "timed out"
    finally:
        await sb.close()


def test_sync_sdk(server: Server, backend: str) -> None:
    with SyncSandbox.create(backend=backend, url=server.url, timeout=60) as sb:
        assert sb.commands.run("echo sync").stdout == "sync\n"
        sb.files.write("/tmp/s.txt", "sync file")
        assert sb.files.read("/tmp/s.txt") == "sync file"
        assert [i.id for i in SyncSandbox.list(url=server.url)].count(sb.id) == 1
        handle = sb.commands.run("cat", background=True)
        handle.send_stdin("x")
        handle.close_stdin()
        assert handle.wait().stdout == "x"
        sandbox_id = sb.id
    again = SyncSandbox.connect(sandbox_id, url=server.url)
    assert again.info.state is SandboxState.STOPPED
    again.close()


async def test_run_code_needs_python(sb: Sandbox) -> None:
    r = await sb.run_code("1 + 1")
    assert r.error is not None
    assert "python3 is not in this sandbox's template" in r.error.value
    js = await sb.run_code("1 + 1", language="javascript")
    assert js.error is not None
    assert "node is not in this sandbox's template" in js.error.value


async def test_run_code_in_the_shell_keeps_its_state(sb: Sandbox) -> None:
    # The base template has busybox's sh: the shell kernel runs there without bash.
    await sb.run_code("x=41; cd /tmp", language="bash")
    r = await sb.run_code("echo $((x + 1)); pwd; printf end", language="bash")
    assert (r.logs.stdout, r.error) == (["42\n", "/tmp\n", "end"], None)
    failed = await sb.run_code("ls /nope", language="bash")
    assert failed.error is not None and failed.error.value == "exit status 1"
    assert failed.logs.stderr
    ctx = await sb.create_code_context(language="bash")
    assert (await sb.run_code("echo ${x:-unset}", context=ctx)).logs.stdout == ["unset\n"]
    with pytest.raises(InvalidRequestError, match="runs bash, not python"):
        await sb.run_code("1", context=ctx, language="python")
    languages = {c.id: c.language for c in await sb.list_code_contexts()}
    assert {"default-bash": "bash", ctx.id: "bash"}.items() <= languages.items()


@pytest.mark.timeout(900)  # the first sandbox of the python template builds it
async def test_run_code_is_a_stateful_interpreter(server: Server, backend: str) -> None:
    async with Sandbox.create("python", backend=backend, url=server.url) as sb:
        r = await sb.run_code("x = 21\nprint('hi')\nx * 2")
        assert r.error is None
        assert [(i.text, i.is_main_result) for i in r.results] == [("42", True)]
        assert r.stdout == ["hi\n"]
        assert r.execution_count == 1
        assert (await sb.run_code("x + 1")).results[0].text == "22"
        err = await sb.run_code("def f():\n    return 1 / 0\nf()")
        assert err.error is not None
        assert err.error.name == "ZeroDivisionError"
        assert '"<cell 3>", line 2, in f' in err.error.traceback
        rich = await sb.run_code(
            "import base64\n"
            "class Both:\n"
            "    def _repr_html_(self): return '<b>bold</b>'\n"
            "    def _repr_png_(self): return base64.b64decode('iVBORw0KGgo=')\n"
            "display(Both())\n"
            "Both()"
        )
        assert [i.is_main_result for i in rich.results] == [False, True]
        assert rich.results[1].html == "<b>bold</b>"
        assert rich.results[1].png == "iVBORw0KGgo="
        slow = await sb.run_code("import time\ntime.sleep(60)", timeout=1)
        assert slow.error is not None
        assert slow.error.name == "TimeoutError"
        assert "interrupted" in slow.error.value
        # The interrupt stopped the cell, not the interpreter: x is still there.
        assert (await sb.run_code("x")).results[0].text == "21"


@pytest.mark.timeout(900)
async def test_code_contexts_keep_their_state_apart(server: Server, backend: str) -> None:
    async with Sandbox.create("python", backend=backend, url=server.url) as sb:
        assert sb.sandbox_id == sb.id
        ctx = await sb.create_code_context(cwd="/tmp")
        other = await sb.create_code_context()
        assert (ctx.language, ctx.cwd) == ("python", "/tmp")
        await sb.run_code("n = 0", context=ctx)
        for _ in range(100):
            await sb.run_code("n += 1", context=ctx)
        counted = await sb.run_code("print('n is', n)\nn", context=ctx)
        assert (counted.text, counted.logs.stdout) == ("100", ["n is 100\n"])
        assert counted.execution_count == 102
        # Not in the other context, nor in the default one; each has its own cwd.
        for elsewhere in (other.id, None):
            missing = await sb.run_code("n", context=elsewhere)
            assert missing.error is not None and missing.error.name == "NameError"
        assert (await sb.run_code("import os; os.getcwd()", context=ctx)).text == "'/tmp'"
        listed = {c.id for c in await sb.list_code_contexts()}
        assert listed == {ctx.id, other.id, "default"}
        # A long cell is interrupted at its timeout; the context keeps its state.
        slow = await sb.run_code("import time\ntime.sleep(60)", context=ctx, timeout=1)
        assert slow.error is not None and slow.error.name == "TimeoutError"
        assert (await sb.run_code("n", context=ctx)).text == "100"
        # A restart forgets; a removed context is gone.
        await sb.restart_code_context(ctx)
        assert (await sb.run_code("'n' in globals()", context=ctx)).text == "False"
        await sb.remove_code_context(other)
        with pytest.raises(NotFoundError, match="code context"):
            await sb.run_code("1", context=other)
        with pytest.raises(NotFoundError, match="code context"):
            await sb.remove_code_context("ctx-000000000000")
        with pytest.raises(InvalidRequestError, match="context"):
            await sb.run_code("1", context="not-a-context")
        made = [await sb.create_code_context() for _ in range(MAX_CONTEXTS - 2)]
        with pytest.raises(ConflictError, match="remove one first"):
            await sb.create_code_context()
        await sb.remove_code_context(made[0])


@pytest.mark.timeout(900)
async def test_run_code_streams_while_the_cell_runs(server: Server, backend: str) -> None:
    """The cell waits for a file that only the on_stdout callback writes: it ends only
    if its first line reached the callback while it was still running."""
    async with Sandbox.create("python", backend=backend, url=server.url) as sb:
        seen: list[tuple[str, str]] = []

        async def on_stdout(line: str) -> None:
            seen.append(("stdout", line))
            if line == "ready\n":
                await sb.files.write("/tmp/go", "")

        execution = await sb.run_code(
            "import os, sys, time\n"
            "print('ready')\n"
            "while not os.path.exists('/tmp/go'):\n"
            "    time.sleep(0.02)\n"
            "print('oops', file=sys.stderr)\n"
            "display(7)\n"
            "raise ValueError('late')",
            on_stdout=on_stdout,
            on_stderr=lambda line: seen.append(("stderr", line)),
            on_result=lambda result: seen.append(("result", result.text or "")),
            on_error=lambda error: seen.append(("error", error.name)),
            timeout=60,
        )
        assert seen == [
            ("stdout", "ready\n"),
            ("stderr", "oops\n"),
            ("result", "7"),
            ("error", "ValueError"),
        ]
        # The whole execution comes back too, as without callbacks.
        assert execution.logs.stdout == ["ready\n"]
        assert execution.error is not None and execution.error.value == "late"
        # A cell stopped at its timeout reports that once, as the timeout it was.
        errors: list[str] = []
        slow = await sb.run_code(
            "import time\ntime.sleep(60)", on_error=lambda e: errors.append(e.name), timeout=1
        )
        assert errors == ["TimeoutError"]
        assert slow.error is not None and slow.error.name == "TimeoutError"
        # A cell's own environment variables end with it.
        during = await sb.run_code("import os; os.environ['STAGE']", envs={"STAGE": "cell"})
        assert during.text == "'cell'"
        assert (await sb.run_code("os.environ.get('STAGE')")).text is None
        with pytest.raises(InvalidRequestError, match="not a shell variable name"):
            await sb.run_code("true", language="bash", envs={"A-B": "1"}, on_stdout=print)


@pytest.mark.timeout(900)  # the first sandbox of the node template builds it
async def test_javascript_runs_in_the_node_template(server: Server, backend: str) -> None:
    async with Sandbox.create("node", backend=backend, url=server.url) as sb:
        await sb.run_code(
            "let total = 0; const add = (n) => { total += n; };", language="javascript"
        )
        for n in range(1, 11):
            await sb.run_code(f"add({n})", language="javascript")
        r = await sb.run_code("console.log('sum', total); ({ total })", language="javascript")
        assert (r.logs.stdout, r.text, r.error) == (["sum 55\n"], "{ total: 55 }", None)
        assert r.results[0].json == '{"total":55}'
        failed = await sb.run_code("null.x", language="javascript")
        assert failed.error is not None and failed.error.name == "TypeError"
        env = await sb.run_code("process.env.STAGE", language="javascript", envs={"STAGE": "js"})
        assert env.text == "'js'"


@pytest.mark.timeout(900)
def test_the_sync_sdk_has_code_contexts_too(server: Server, backend: str) -> None:
    with SyncSandbox.create("python", backend=backend, url=server.url, timeout=120) as sb:
        assert sb.sandbox_id == sb.id
        ctx = sb.create_code_context()
        sb.run_code("x = 'mine'", context=ctx)
        assert sb.run_code("x", context=ctx).text == "'mine'"
        assert sb.run_code("'x' in globals()").text == "False"
        assert ctx.id in {c.id for c in sb.list_code_contexts()}
        assert sb.restart_code_context(ctx).id == ctx.id
        sb.remove_code_context(ctx)


@pytest.mark.timeout(900)
def test_readme_quick_start_runs_as_written(server: Server, backend: str) -> None:
    """The README's Python block, verbatim, against this server (the python template is
    built by the test above, or here)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    env = dict(server.env, TARTARUS_URL=server.url)
    out = subprocess.run(
        [sys.executable, "-c", block],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == "42\nhi\n42\n"
