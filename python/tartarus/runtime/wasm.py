"""The wasm backend: WASI (preview1) modules under wasmtime, in this process.

A sandbox is a compiled module plus a private host directory pre-opened as `/`. Each
exec instantiates the module in a fresh store with the request's argv and env, a
memory limit, and stdout/stderr captured chunk by chunk into a bounded buffer (oldest
chunks dropped and counted, the module never blocks on a slow reader).

Timeouts and kills use epoch interruption. Every running exec owns an engine (engines
are pooled per module file, each holding the module deserialised from the one compiled
when a sandbox of it first started; sandboxes of one module share the pool), so bumping
that engine's epoch interrupts that exec alone.

wasmtime's calls block, so each exec runs on a thread of its own that only computes;
it hands output to the event loop through `anyio.from_thread` with the loop's token.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import shutil
import signal
import stat
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec
import wasmtime

from tartarus.file_identity import FileIdentity, file_identity
from tartarus.runtime.base import (
    DirWatch,
    NotSupportedError,
    SandboxError,
    SandboxNotFoundError,
    refuse_network,
)
from tartarus.runtime.hostfs import HostDir
from tartarus.runtime.types import (
    Backend,
    ExecEvent,
    ExecRequest,
    ExecResult,
    ExitStatus,
    FileInfo,
    LogEntry,
    OutputChunk,
    ProcessInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
    Stream,
)

# Output kept per process for late readers and attach; older chunks are dropped.
PROCESS_BUFFER_BYTES: Final = 32 << 20
# The sandbox log (all processes) keeps this much.
LOG_BUFFER_BYTES: Final = 16 << 20
WASM_PAGE: Final = 64 << 10

log = logging.getLogger(__name__)


class WasmError(SandboxError):
    pass


class _Wakeup:
    """Lets a worker thread wake tasks waiting on the event loop."""

    def __init__(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._event = anyio.Event()

    def current(self) -> anyio.Event:
        """The event to wait on; take it *before* checking the condition."""
        return self._event

    def notify(self) -> None:
        """On the loop thread."""
        event, self._event = self._event, anyio.Event()
        event.set()

    def notify_from_thread(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            anyio.from_thread.run_sync(self.notify, token=self._token)


class _Chunks:
    """Output chunks with sequence numbers, bounded in bytes (oldest dropped)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[tuple[int, Any]] = deque()
        self.size = 0
        self.next_seq = 0
        self.lock = threading.Lock()

    def push(self, make: Callable[[int], Any], size: int) -> None:
        """Appends `make(seq)` under the lock, so sequence numbers follow append order."""
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            self.items.append((seq, make(seq)))
            self.size += size
            while self.size > self.limit and len(self.items) > 1:
                _, old = self.items.popleft()
                self.size -= len(old.data)

    def since(self, seq: int) -> tuple[list[Any], int]:
        """Items with sequence ≥ seq, and how many of those were already dropped."""
        with self.lock:
            first = self.items[0][0] if self.items else self.next_seq
            dropped = max(0, first - seq)
            return [item for s, item in self.items if s >= seq], dropped


class _Process:
    """One exec: its output, its exit, and the engine that can interrupt it."""

    def __init__(self, pid: int, argv: list[str], wake: _Wakeup) -> None:
        self.pid = pid
        self.argv = argv
        self.started_at = time.time()
        self.output = _Chunks(PROCESS_BUFFER_BYTES)
        self.exit: ExitStatus | None = None
        self.wake = wake
        # Set while the exec runs on its lent engine; `_lend` guards it, so an interrupt
        # never bumps an engine already given back (and lent to another sandbox).
        self.engine: wasmtime.Engine | None = None
        self._lend = threading.Lock()
        self.killed_by: int | None = None
        self.timed_out = False
        self.stdin_fd: int | None = None
        # Set once the module's side of the stdin FIFO is open: closing our end before
        # that would leave the module's open() waiting for a writer forever.
        self.stdin_opened = threading.Event()
        self.timer: threading.Timer | None = None

    def interrupt(self, *, timeout: bool = False, sig: int = signal.SIGKILL) -> None:
        """Stops the running module at its next epoch check (thread-safe)."""
        if self.exit is not None:
            return
        if timeout:
            self.timed_out = True
        self.killed_by = sig
        with self._lend:
            if self.engine is not None:
                self.engine.increment_epoch()

    def lend(self, engine: wasmtime.Engine | None) -> None:
        with self._lend:
            self.engine = engine


class WasmExecution:
    """A view over one process's output: from `since_seq`, then following it."""

    def __init__(self, proc: _Process, since_seq: int = 0) -> None:
        self._proc = proc
        self._cursor = since_seq
        self._dropped = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def events(self) -> AsyncIterator[ExecEvent]:
        proc = self._proc
        while True:
            event = proc.wake.current()
            items, dropped = proc.output.since(self._cursor)
            self._dropped += dropped
            for chunk in items:
                self._cursor = chunk.seq + 1
                yield chunk
            if not items:
                if proc.exit is not None:
                    exit_ = proc.exit
                    if self._dropped:
                        dropped = exit_.dropped_chunks + self._dropped
                        exit_ = msgspec.structs.replace(exit_, dropped_chunks=dropped)
                    yield exit_
                    return
                await event.wait()

    async def write_stdin(self, data: bytes) -> None:
        fd = self._proc.stdin_fd
        if fd is None:
            raise WasmError(f"process {self.pid} has no open stdin (exec with stdin=True)")
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await anyio.wait_writable(fd)
                continue
            except BrokenPipeError as e:
                raise WasmError(f"process {self.pid} no longer reads stdin") from e
            view = view[n:]

    async def close_stdin(self) -> None:
        proc = self._proc
        if proc.stdin_fd is None:
            return
        # Set by the exec's thread at the latest when it ends.
        await anyio.to_thread.run_sync(proc.stdin_opened.wait)
        fd, proc.stdin_fd = proc.stdin_fd, None
        if fd is not None:
            os.close(fd)

    async def resize(self, rows: int, cols: int) -> None:
        raise NotSupportedError(Backend.WASM, "terminals")

    async def kill(self, signal: int = 9) -> None:
        self._proc.interrupt(sig=signal)

    async def wait(self) -> ExecResult:
        out = {"stdout": bytearray(), "stderr": bytearray()}
        exit_: ExitStatus | None = None
        async for event in self.events():
            if isinstance(event, OutputChunk):
                out[event.stream] += event.data
            else:
                exit_ = event
        assert exit_ is not None
        return ExecResult(stdout=bytes(out["stdout"]), stderr=bytes(out["stderr"]), exit=exit_)


def _trap_message(e: Exception) -> str:
    """The trap's first line and its root cause (wasmtime adds a backtrace between)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    causes = [line for line in lines if line[:1].isdigit() and ": " in line]
    return lines[0] + (f" ({causes[-1].split(': ', 1)[1]})" if causes else "")


def _engine_config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.epoch_interruption = True
    return config


class _EnginePool:
    """Engines with the module loaded; one is lent to each running exec (an engine's
    epoch interrupts every store on it, so a running exec has its engine to itself).
    Sandboxes of one module share its pool: a module is immutable compiled code, and
    each exec's state lives in its own Store, dropped when the exec ends."""

    # Free engines kept for reuse; more were lent at once only under a burst.
    MAX_FREE = 8

    def __init__(self, engine: wasmtime.Engine, module: wasmtime.Module) -> None:
        self._compiled = module
        # The compiled code, for more engines: serialised when a second one is needed
        # (most sandboxes run one exec at a time, and a cold start should not pay it).
        self._serialized: bytes | None = None
        self._free = [(engine, module, _linker(engine))]
        self._lock = threading.Lock()

    @classmethod
    def compile(cls, module_path: Path) -> _EnginePool:
        engine = wasmtime.Engine(_engine_config())
        try:
            module = wasmtime.Module.from_file(engine, str(module_path))
        except (wasmtime.WasmtimeError, OSError) as e:
            raise WasmError(f"cannot compile {module_path}: {e}") from e
        return cls(engine, module)

    def take(self) -> tuple[wasmtime.Engine, wasmtime.Module, wasmtime.Linker]:
        with self._lock:
            if self._free:
                return self._free.pop()
            if self._serialized is None:
                self._serialized = bytes(self._compiled.serialize())
            serialized = self._serialized
        engine = wasmtime.Engine(_engine_config())
        module = wasmtime.Module.deserialize(engine, serialized)
        return engine, module, _linker(engine)

    def give(self, item: tuple[wasmtime.Engine, wasmtime.Module, wasmtime.Linker]) -> None:
        with self._lock:
            if len(self._free) < self.MAX_FREE:
                self._free.append(item)


class _CompiledModules:
    """Compiled modules by file (path, inode, size, mtime), the most recently used few:
    a sandbox of a module another sandbox ran starts without compiling it again (the
    compile is most of a cold start). A file replaced in place is a new key."""

    MAX_MODULES = 16

    def __init__(self) -> None:
        self._pools: OrderedDict[FileIdentity, _EnginePool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(module_path: Path) -> FileIdentity:
        try:
            return file_identity(module_path)
        except OSError as e:
            raise WasmError(f"cannot compile {module_path}: {e}") from e

    def cached(self, key: FileIdentity) -> _EnginePool | None:
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
            return pool

    def compile(self, key: FileIdentity, module_path: Path) -> _EnginePool:
        """On a worker thread: compiles and remembers (two racing compiles keep one)."""
        pool = _EnginePool.compile(module_path)
        with self._lock:
            pool = self._pools.setdefault(key, pool)
            self._pools.move_to_end(key)
            while len(self._pools) > self.MAX_MODULES:
                self._pools.popitem(last=False)
        return pool


_COMPILED = _CompiledModules()


class _Workers:
    """The threads modules run on, each kept parked for `IDLE_S` after a run: starting
    a thread costs about a millisecond, handing a parked one a run a few microseconds.
    A run never waits for a busy thread (a module may run for minutes): with none
    parked, a new one starts."""

    IDLE_S = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parked: list[queue.SimpleQueue[tuple[Callable[[], None], str]]] = []

    def run(self, job: Callable[[], None], *, name: str) -> None:
        with self._lock:
            inbox = self._parked.pop() if self._parked else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), daemon=True).start()
        inbox.put((job, name))

    def _serve(self, inbox: queue.SimpleQueue[tuple[Callable[[], None], str]]) -> None:
        me = threading.current_thread()
        while True:
            try:
                job, me.name = inbox.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if inbox in self._parked:
                        self._parked.remove(inbox)
                        return
                continue  # taken just now: its run is on the way
            try:
                job()
            except Exception:  # the job records its own failures; this is a backstop
                log.exception("a wasm run failed outside its own handling")
            me.name = "wasm-parked"
            with self._lock:
                self._parked.append(inbox)


_WORKERS = _Workers()


def _linker(engine: wasmtime.Engine) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    return linker


class WasmSandbox:
    def __init__(self, spec: SandboxSpec, directory: Path) -> None:
        if spec.wasm_module is None:
            raise WasmError("the wasm backend needs SandboxSpec.wasm_module (a .wasm or .wat file)")
        self.spec = spec
        self._dir = directory
        self._fs_root = directory / "fs"
        self.files = HostDir(self._fs_root)
        self._state = SandboxState.CREATED
        self._pool: _EnginePool | None = None
        self._procs: dict[int, _Process] = {}
        self._next_pid = 1
        self._log = _Chunks(LOG_BUFFER_BYTES)
        self._wake: _Wakeup | None = None
        self._cpu_seconds = 0.0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def lost(self) -> bool:
        return False  # it runs in the server's own process

    async def detach(self) -> bool:
        return False  # it runs in the server's own process

    @property
    def backend(self) -> Backend:
        return Backend.WASM

    async def start(self) -> None:
        if self._state is SandboxState.RUNNING:
            return
        module_path = self.spec.wasm_module
        assert module_path is not None
        self._fs_root.mkdir(parents=True, exist_ok=True)
        self._wake = _Wakeup()
        key = _COMPILED.key(module_path)
        pool = _COMPILED.cached(key)
        if pool is None:
            pool = await anyio.to_thread.run_sync(_COMPILED.compile, key, module_path)
        self._pool = pool
        self._state = SandboxState.RUNNING

    async def status(self) -> SandboxStatus:
        running = sum(1 for p in self._procs.values() if p.exit is None)
        return SandboxStatus(
            id=self.id, backend=Backend.WASM, state=self._state, detail=f"{running} running"
        )

    def _require_running(self) -> tuple[_EnginePool, _Wakeup]:
        if self._state is not SandboxState.RUNNING or self._pool is None or self._wake is None:
            raise WasmError(f"sandbox {self.id} is {self._state.value}, not running")
        return self._pool, self._wake

    async def exec(self, request: ExecRequest) -> WasmExecution:
        pool, wake = self._require_running()
        if request.shell is not None or not request.argv:
            raise NotSupportedError(Backend.WASM, "shell commands (pass argv)")
        if request.pty is not None:
            raise NotSupportedError(Backend.WASM, "terminals")
        if request.user is not None:
            raise NotSupportedError(Backend.WASM, "running as another user")
        pid = self._next_pid
        self._next_pid += 1
        proc = _Process(pid, list(request.argv), wake)
        self._procs[pid] = proc
        stdin_path: Path | None = None
        if request.stdin:
            stdin_path = self._dir / f"stdin-{pid}-{uuid.uuid4().hex[:6]}"
            os.mkfifo(stdin_path, 0o600)
            # Read-write, so the module's open of the read end does not block.
            proc.stdin_fd = os.open(stdin_path, os.O_RDWR | os.O_NONBLOCK)
        env = {**self.spec.env, **request.env}
        _WORKERS.run(
            functools.partial(self._run, pool, proc, env, stdin_path, request.timeout_s),
            name=f"wasm-{self.id}-{pid}",
        )
        return WasmExecution(proc)

    def _run(
        self,
        pool: _EnginePool,
        proc: _Process,
        env: dict[str, str],
        stdin_path: Path | None,
        timeout_s: float | None,
    ) -> None:
        """On the exec's thread: runs the module to completion and records the exit."""
        started = time.perf_counter()
        cpu_started = time.thread_time()
        item = pool.take()
        proc.lend(item[0])
        if timeout_s is not None:
            proc.timer = threading.Timer(timeout_s, proc.interrupt, kwargs={"timeout": True})
            proc.timer.daemon = True
            proc.timer.start()
        try:
            code, trap, memory_pages = self._instantiate_and_run(item, proc, env, stdin_path)
        except Exception as e:  # reported as the exec's failure, never lost
            code, trap, memory_pages = None, f"internal error: {e!r}", 0
        finally:
            proc.stdin_opened.set()
            if proc.timer is not None:
                proc.timer.cancel()
            proc.lend(None)
            pool.give(item)
            if stdin_path is not None:
                with contextlib.suppress(OSError):
                    stdin_path.unlink()
        self._cpu_seconds += time.thread_time() - cpu_started
        limit_pages = (self.spec.resources.memory_mib << 20) // WASM_PAGE
        # A trap with memory at the limit: the module's allocation was refused.
        oom = trap is not None and memory_pages + 16 > limit_pages
        if trap is not None and proc.killed_by is None:
            message = f"wasm trap: {trap}" + (" (memory limit reached)" if oom else "") + "\n"
            self._emit(proc, "stderr", message.encode())
        signal_ = proc.killed_by if code is None else None
        if code is None and signal_ is None:
            signal_ = signal.SIGKILL if oom else signal.SIGABRT
        proc.exit = ExitStatus(
            pid=proc.pid,
            code=code,
            signal=signal_,
            timed_out=proc.timed_out,
            oom_killed=oom,
            duration_s=round(time.perf_counter() - started, 6),
        )
        proc.wake.notify_from_thread()

    def _instantiate_and_run(
        self,
        item: tuple[wasmtime.Engine, wasmtime.Module, wasmtime.Linker],
        proc: _Process,
        env: dict[str, str],
        stdin_path: Path | None,
    ) -> tuple[int | None, str | None, int]:
        """Returns (exit code, trap message, memory pages at the end)."""
        engine, module, linker = item
        memory_pages = 0
        try:
            store = wasmtime.Store(engine)
            store.set_epoch_deadline(1)
            store.set_limits(memory_size=self.spec.resources.memory_mib << 20)
            wasi = wasmtime.WasiConfig()
            wasi.argv = proc.argv
            wasi.env = list(env.items())
            wasi.preopen_dir(str(self._fs_root), "/")
            if stdin_path is not None:
                wasi.stdin_file = str(stdin_path)  # opens it, so our end may close now
                proc.stdin_opened.set()
            wasi.stdout_custom = self._sink(proc, "stdout")
            wasi.stderr_custom = self._sink(proc, "stderr")
            store.set_wasi(wasi)
            if proc.killed_by is not None:  # killed before it started
                engine.increment_epoch()
            instance = linker.instantiate(store, module)
            try:
                start = instance.exports(store)["_start"]
                assert isinstance(start, wasmtime.Func)
                start(store)
                return 0, None, memory_pages
            finally:
                memory = instance.exports(store).get("memory")
                if isinstance(memory, wasmtime.Memory):
                    memory_pages = memory.size(store)
        except wasmtime.ExitTrap as e:
            return e.code, None, memory_pages
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            return None, _trap_message(e), memory_pages

    def _sink(self, proc: _Process, stream: Stream) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            self._emit(proc, stream, bytes(data))

        return write

    def _emit(self, proc: _Process, stream: Stream, data: bytes) -> None:
        proc.output.push(
            lambda seq: OutputChunk(pid=proc.pid, stream=stream, seq=seq, data=data), len(data)
        )
        now = time.time()
        self._log.push(
            lambda seq: LogEntry(seq=seq, ts=now, pid=proc.pid, stream=stream, data=data),
            len(data),
        )
        proc.wake.notify_from_thread()

    async def processes(self) -> list[ProcessInfo]:
        return [
            ProcessInfo(
                pid=p.pid,
                argv=p.argv,
                started_at=p.started_at,
                running=p.exit is None,
                exit=p.exit,
            )
            for p in self._procs.values()
        ]

    def _proc(self, pid: int) -> _Process:
        try:
            return self._procs[pid]
        except KeyError:
            raise SandboxNotFoundError(f"sandbox {self.id} has no process {pid}") from None

    async def attach(self, pid: int) -> WasmExecution:
        return WasmExecution(self._proc(pid))

    async def kill_process(self, pid: int, signal: int = 9) -> None:
        self._proc(pid).interrupt(sig=signal)

    async def logs(self, *, follow: bool = False, since_seq: int = 0) -> AsyncIterator[LogEntry]:
        wake = self._wake
        cursor = since_seq
        while True:
            event = wake.current() if wake is not None else None
            items, _ = self._log.since(cursor)
            for entry in items:
                cursor = entry.seq + 1
                yield entry
            if not follow or event is None:
                return
            if not items:
                if self._state is not SandboxState.RUNNING:
                    return
                await event.wait()

    async def read_file(self, path: str) -> bytes:
        return await anyio.to_thread.run_sync(self.files.read_file, path)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self.files.write_file(path, data, mode=mode)

    def download(self, path: str) -> AsyncIterator[bytes]:
        return self.files.download(path)

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        return await self.files.upload(path, chunks, mode=mode)

    async def list_dir(self, path: str) -> list[FileInfo]:
        return self.files.list_dir(path)

    async def stat(self, path: str) -> FileInfo:
        return self.files.stat(path)

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        self.files.make_dir(path, parents=parents)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        self.files.remove(path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        self.files.rename(src, dst)

    async def stats(self) -> SandboxStats:
        running = sum(1 for p in self._procs.values() if p.exit is None)
        used = _tree_size(self._fs_root) if self._fs_root.exists() else 0
        return SandboxStats(
            cpu_seconds=round(self._cpu_seconds, 6),
            memory_bytes=used,
            memory_limit_bytes=self.spec.resources.memory_mib << 20,
            pids=running,
        )

    async def watch_dir(self, path: str, *, recursive: bool = False) -> DirWatch:
        raise NotSupportedError(Backend.WASM, "watching directories")

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(Backend.WASM, "snapshots")

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(Backend.WASM, "pausing")

    async def freeze(self) -> None:
        raise NotSupportedError(Backend.WASM, "pausing")

    async def thaw(self) -> None:
        raise NotSupportedError(Backend.WASM, "pausing")

    async def port_address(self, port: int) -> tuple[str, int]:
        raise NotSupportedError(Backend.WASM, "ports (a module has no sockets)")

    async def stop(self, grace_s: float = 10.0) -> StopOutcome:
        """A module has no signal handlers: running execs are interrupted, then we wait
        up to `grace_s` for their threads to report."""
        running = [proc for proc in self._procs.values() if proc.exit is None]
        for proc in running:
            proc.interrupt(sig=signal.SIGTERM)
        with anyio.move_on_after(grace_s):
            for proc in running:
                while proc.exit is None:
                    await proc.wake.current().wait()
        late = sum(proc.exit is None for proc in running)
        await self.kill()
        return StopOutcome(terminated=len(running) - late, killed=late)

    async def halt(self) -> None:
        for proc in self._procs.values():
            proc.interrupt()
            if proc.stdin_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(proc.stdin_fd)
                proc.stdin_fd = None
        if self._state is not SandboxState.STOPPED:
            self._state = SandboxState.STOPPED
            if self._wake is not None:
                self._wake.notify()

    async def kill(self) -> None:
        await self.halt()
        if await anyio.Path(self._dir).exists():
            await anyio.to_thread.run_sync(shutil.rmtree, self._dir, True)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                st = (Path(dirpath) / name).lstat()
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


class WasmRuntime:
    """The wasm backend on this host; sandboxes live under `state_dir/wasm/<id>`."""

    def __init__(self, state_dir: Path) -> None:
        self._root = state_dir / "wasm"

    @property
    def backend(self) -> Backend:
        return Backend.WASM

    async def create(self, spec: SandboxSpec) -> WasmSandbox:
        refuse_network(spec, Backend.WASM)
        if spec.wasm_module is None or not spec.wasm_module.is_file():
            raise WasmError(f"wasm module {spec.wasm_module} is not a file")
        directory = self._root / spec.id
        directory.mkdir(parents=True, exist_ok=False)
        return WasmSandbox(spec, directory)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> WasmSandbox:
        raise NotSupportedError(Backend.WASM, "snapshots")

    async def reattach(self, spec: SandboxSpec) -> WasmSandbox | None:
        """None: a wasm sandbox runs inside its server and dies with it."""
        return None

    async def reap(self, keep: set[str]) -> list[str]:
        """Removes sandbox directories left by a previous process (modules die with it)."""
        removed = []
        if self._root.is_dir():
            for entry in self._root.iterdir():
                if entry.name not in keep:
                    await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
                    removed.append(entry.name)
        return removed
