"""The agent-backed half of a `Sandbox`: exec, processes, attach, logs and files, all
through `tartarus-agent`. A backend (gvisor, jail, microvm) subclasses `AgentSandbox`,
connects `self.agent` when it starts the sandbox, and adds only the lifecycle:
start, status, stop, kill, snapshot (and stats where it knows better than the agent).
"""

from __future__ import annotations

import abc
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Final

import anyio

from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient, AgentError, RequestStream
from tartarus.runtime.base import Execution, NotSupportedError, SandboxError
from tartarus.runtime.types import (
    Backend,
    ExecEvent,
    ExecRequest,
    ExecResult,
    ExitStatus,
    FileInfo,
    FileKind,
    FsChange,
    LogEntry,
    OutputChunk,
    ProcessInfo,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
    Stream,
)

# read_file reads small files in one frame and streams larger ones up to this bound.
DEFAULT_READ_LIMIT: Final = 64 << 20
# Files up to this size are written with one frame.
_WRITE_IN_ONE_FRAME: Final = 3 << 20
_CHUNK: Final = p.MAX_CHUNK_BYTES
# Chunk requests kept in flight while streaming a file.
_WINDOW: Final = 4
# stdout/stderr kept by Execution.wait(), per stream; the rest is dropped and counted.
DEFAULT_WAIT_LIMIT: Final = 256 << 20


async def _close_handle(client: AgentClient, handle: int) -> None:
    """Closes a file handle even while the caller is being cancelled."""
    # A failure means the handle is gone with the connection, or already closed.
    with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(AgentError):
        await client.call(p.CloseHandle(handle=handle))


def exit_status(info: p.ExitInfo, *, extra_dropped: int = 0) -> ExitStatus:
    return ExitStatus(
        pid=info.pid,
        code=info.code,
        signal=info.signal,
        timed_out=info.timed_out,
        dropped_chunks=info.dropped_chunks + extra_dropped,
        duration_s=info.duration_s,
    )


def _stream_name(name: str) -> Stream:
    return "stderr" if name == "stderr" else "stdout"


def file_info(info: p.FileInfo) -> FileInfo:
    try:
        kind = FileKind(info.kind)
    except ValueError:
        kind = FileKind.OTHER
    return FileInfo(
        path=info.path, name=info.name, kind=kind, size=info.size, mode=info.mode, mtime=info.mtime
    )


def exec_message(request: ExecRequest) -> p.Exec:
    return p.Exec(
        argv=list(request.argv) if request.argv is not None else None,
        shell=request.shell,
        env=dict(request.env),
        cwd=request.cwd,
        user=request.user,
        stdin=request.stdin,
        pty=p.PtySize(rows=request.pty.rows, cols=request.pty.cols) if request.pty else None,
        timeout_s=float(request.timeout_s) if request.timeout_s is not None else None,
        background=request.background,
        buffer_bytes=request.buffer_bytes,
    )


class AgentExecution(Execution):
    """A process in the sandbox, seen through one exec or attach stream."""

    def __init__(self, client: AgentClient, stream: RequestStream, pid: int, pty: bool) -> None:
        self._client = client
        self._stream = stream
        self._pid = pid
        self.pty = pty
        self._exit: ExitStatus | None = None
        self._finished = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def exit(self) -> ExitStatus | None:
        return self._exit

    async def events(self) -> AsyncGenerator[ExecEvent, None]:
        """Output chunks in order, then the `ExitStatus`. A detached or non-following
        attach stream ends without an exit status."""
        try:
            while not self._finished:
                message = await self._stream.next()
                if isinstance(message, p.Output):
                    yield OutputChunk(
                        pid=message.pid,
                        stream=_stream_name(message.stream),
                        seq=message.seq,
                        data=message.data,
                    )
                elif isinstance(message, p.Exit):
                    self._finished = True
                    self._exit = exit_status(message, extra_dropped=self._stream.dropped)
                    yield self._exit
                elif isinstance(message, p.End):
                    self._finished = True
                else:
                    raise AgentError(
                        "unexpected_reply", f"unexpected {p.type_name(message)} in an exec stream"
                    )
        finally:
            if self._finished:
                self._stream.close()

    async def write_stdin(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            piece = bytes(view[start : start + _CHUNK])
            await self._client.call_expect(p.WriteStdin(pid=self._pid, data=piece), p.Ok)

    async def close_stdin(self) -> None:
        await self._client.call_expect(p.CloseStdin(pid=self._pid), p.Ok)

    async def resize(self, rows: int, cols: int) -> None:
        await self._client.call_expect(p.Resize(pid=self._pid, rows=rows, cols=cols), p.Ok)

    async def kill(self, signal: int = 9) -> None:
        await self._client.call_expect(p.Signal(pid=self._pid, signal=signal), p.Ok)

    async def detach(self) -> None:
        """Stops following the output; the process keeps running (attach again later)."""
        self._finished = True
        await self._stream.cancel()

    async def wait(self, *, limit_bytes: int = DEFAULT_WAIT_LIMIT) -> ExecResult:
        """Collects the remaining output (up to `limit_bytes` per stream; the rest is
        dropped and counted in `dropped_chunks`) and the exit status."""
        out = {"stdout": bytearray(), "stderr": bytearray()}
        over = 0
        async for event in self.events():
            if isinstance(event, OutputChunk):
                buf = out[event.stream]
                if len(buf) + len(event.data) > limit_bytes:
                    over += 1
                    continue
                buf += event.data
        if self._exit is None:
            raise SandboxError(
                f"process {self._pid}: the output stream ended before the process exited"
            )
        exit_ = self._exit
        if over:
            exit_ = ExitStatus(
                pid=exit_.pid,
                code=exit_.code,
                signal=exit_.signal,
                timed_out=exit_.timed_out,
                oom_killed=exit_.oom_killed,
                dropped_chunks=exit_.dropped_chunks + over,
                duration_s=exit_.duration_s,
            )
        return ExecResult(stdout=bytes(out["stdout"]), stderr=bytes(out["stderr"]), exit=exit_)


class AgentDirWatch:
    """A directory watch in the agent (inotify); `close` cancels it there."""

    def __init__(self, stream: RequestStream) -> None:
        self._stream = stream

    async def changes(self) -> AsyncGenerator[FsChange, None]:
        while True:
            message = await self._stream.next()
            if isinstance(message, p.End):
                return
            if isinstance(message, p.FsEvent):
                yield FsChange(path=message.path, kind=message.kind)

    async def close(self) -> None:
        await self._stream.cancel()


class AgentSandbox(abc.ABC):
    """Implements the agent-backed parts of the `Sandbox` protocol. Subclasses set
    `self.agent` (an `AgentClient`) once the sandbox runs and implement the lifecycle."""

    def __init__(self) -> None:
        self._agent: AgentClient | None = None

    @property
    def agent(self) -> AgentClient:
        if self._agent is None or self._agent.closed:
            raise SandboxError(f"sandbox {self.id} is not running (no agent connection)")
        return self._agent

    @agent.setter
    def agent(self, client: AgentClient | None) -> None:
        self._agent = client

    @property
    def lost(self) -> bool:
        # Whatever hangs up on purpose (a stop, a snapshot) lets go of the client
        # first; a closed one still held went away by itself.
        return self._agent is not None and self._agent.closed

    async def close_agent(self) -> None:
        if self._agent is not None:
            client, self._agent = self._agent, None
            await client.aclose()

    async def detach(self) -> bool:
        return False  # backends whose sandboxes can outlive the server say otherwise

    async def port_address(self, port: int) -> tuple[str, int]:
        raise NotSupportedError(self.backend, "reaching a port inside the sandbox yet")

    # ---- lifecycle: the backend's part ----

    @property
    @abc.abstractmethod
    def id(self) -> str: ...

    @property
    @abc.abstractmethod
    def backend(self) -> Backend: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def status(self) -> SandboxStatus: ...

    @abc.abstractmethod
    async def snapshot(self, dest_dir: Path) -> SnapshotInfo: ...

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        """Writes a snapshot to `dest_dir`, then ends the sandbox: what a pause leaves
        (Hypnos). Backends that can end without first carrying on override it."""
        info = await self.snapshot(dest_dir)
        await self.kill()
        return info

    async def freeze(self) -> None:
        """Stops every process where it is, memory kept (a pause without a snapshot)."""
        raise NotSupportedError(self.backend, "freezing")

    async def thaw(self) -> None:
        raise NotSupportedError(self.backend, "freezing")

    @abc.abstractmethod
    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None: ...

    @abc.abstractmethod
    async def kill(self) -> None: ...

    async def halt(self) -> None:
        """Backends that cannot stop their code faster than they tear down kill."""
        await self.kill()

    async def stats(self) -> SandboxStats:
        """Usage as the agent sees it from inside; backends with cgroups know better."""
        s = await self.agent.call_expect(p.GetStats(), p.StatsResult)
        return SandboxStats(
            cpu_seconds=s.cpu_seconds,
            memory_bytes=s.memory_bytes,
            memory_limit_bytes=s.memory_total_bytes or None,
            pids=s.pids,
        )

    async def shutdown_agent(self, grace_s: float) -> StopOutcome | None:
        """Asks the agent to terminate every process (SIGTERM, `grace_s`, SIGKILL) and
        exit; returns how they ended (None from an agent too old to say). The connection
        closing before the reply counts as done."""
        try:
            reply = await self.agent.call(p.Shutdown(grace_s=grace_s), timeout_s=grace_s + 10)
        except AgentError as exc:
            if exc.code != "connection":
                raise
            return None
        if isinstance(reply, p.ShutDown):
            return StopOutcome(terminated=reply.terminated, killed=reply.killed)
        return None

    # ---- processes ----

    async def _open_execution(self, request: p.Exec | p.Attach) -> AgentExecution:
        client = self.agent
        stream = await client.start(request)
        try:
            started = await stream.reply()
        except BaseException:
            stream.close()
            raise
        if not isinstance(started, p.Started):
            stream.close()
            raise AgentError("unexpected_reply", f"agent answered exec with {p.type_name(started)}")
        return AgentExecution(client, stream, started.pid, started.pty)

    async def exec(self, request: ExecRequest) -> AgentExecution:
        return await self._open_execution(exec_message(request))

    async def processes(self) -> list[ProcessInfo]:
        reply = await self.agent.call_expect(p.ListProcesses(), p.ProcessList)
        return [
            ProcessInfo(
                pid=proc.pid,
                argv=proc.argv,
                started_at=proc.started_at,
                running=proc.running,
                pty=proc.pty,
                exit=exit_status(proc.exit) if proc.exit is not None else None,
            )
            for proc in reply.processes
        ]

    async def attach(self, pid: int, *, since_seq: int = 0) -> AgentExecution:
        """Replays the buffered output of process `pid` (after `since_seq`), then follows."""
        return await self._open_execution(p.Attach(pid=pid, since_seq=since_seq, follow=True))

    async def kill_process(self, pid: int, signal: int = 9) -> None:
        await self.agent.call_expect(p.Signal(pid=pid, signal=signal), p.Ok)

    async def logs(
        self, *, follow: bool = False, since_seq: int = 0
    ) -> AsyncGenerator[LogEntry, None]:
        stream = await self.agent.start(p.Logs(since_seq=since_seq, follow=follow))
        try:
            while True:
                message = await stream.next()
                if isinstance(message, p.End):
                    return
                if isinstance(message, p.Log):
                    yield LogEntry(
                        seq=message.seq,
                        ts=message.ts,
                        pid=message.pid,
                        stream=_stream_name(message.stream),
                        data=message.data,
                    )
        finally:
            if follow:
                await stream.cancel()
            else:
                stream.close()

    # ---- files ----

    async def read_file(self, path: str, *, max_bytes: int = DEFAULT_READ_LIMIT) -> bytes:
        try:
            reply = await self.agent.call_expect(
                p.ReadFile(path=path, max_bytes=min(max_bytes, _WRITE_IN_ONE_FRAME)), p.FileData
            )
        except AgentError as exc:
            if exc.code != "too_large" or max_bytes <= _WRITE_IN_ONE_FRAME:
                raise
        else:
            return reply.data
        data = bytearray()
        async for chunk in self.download(path):
            data += chunk
            if len(data) > max_bytes:
                raise AgentError(
                    "too_large", f"{path} is larger than {max_bytes} bytes; use download()"
                )
        return bytes(data)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        if len(data) <= _WRITE_IN_ONE_FRAME:
            await self.agent.call_expect(p.WriteFile(path=path, data=data, mode=mode), p.Ok)
            return

        async def pieces() -> AsyncIterator[bytes]:
            yield data

        await self.upload(path, pieces(), mode=mode)

    async def download(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's bytes in order, in chunks of up to 1 MiB, several in flight."""
        client = self.agent
        opened = await client.call_expect(p.OpenRead(path=path), p.Opened)
        pending: deque[RequestStream] = deque()
        offset = 0
        try:
            for _ in range(_WINDOW):
                pending.append(await client.start(p.ReadChunk(opened.handle, offset, _CHUNK)))
                offset += _CHUNK
            while pending:
                reply = await pending[0].reply()
                pending.popleft().close()
                if not isinstance(reply, p.Chunk):
                    raise AgentError("unexpected_reply", f"read_chunk got {p.type_name(reply)}")
                if reply.data:
                    yield reply.data
                if reply.eof:
                    return
                pending.append(await client.start(p.ReadChunk(opened.handle, offset, _CHUNK)))
                offset += _CHUNK
        finally:
            for stream in pending:
                stream.close()
            await _close_handle(client, opened.handle)

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        """Streams a file in; it replaces `path` atomically once complete."""
        client = self.agent
        opened = await client.call_expect(p.OpenWrite(path=path, mode=mode), p.Opened)
        pending: deque[RequestStream] = deque()
        offset = 0
        committed = False
        try:
            async for chunk in chunks:
                view = memoryview(chunk)
                for start in range(0, len(view), _CHUNK):
                    piece = bytes(view[start : start + _CHUNK])
                    pending.append(await client.start(p.WriteChunk(opened.handle, offset, piece)))
                    offset += len(piece)
                    if len(pending) >= _WINDOW:
                        await pending[0].reply()
                        pending.popleft().close()
            while pending:
                await pending[0].reply()
                pending.popleft().close()
            reply = await client.call_expect(p.Commit(handle=opened.handle), p.Committed)
            committed = True
            return reply.size
        finally:
            for stream in pending:
                stream.close()
            if not committed:
                # Closing an uncommitted handle discards the temporary file.
                await _close_handle(client, opened.handle)

    async def list_dir(self, path: str) -> list[FileInfo]:
        reply = await self.agent.call_expect(p.ListDir(path=path), p.DirListing)
        return [file_info(entry) for entry in reply.entries]

    async def stat(self, path: str) -> FileInfo:
        return file_info(await self.agent.call_expect(p.Stat(path=path), p.FileInfoMsg))

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        await self.agent.call_expect(p.Mkdir(path=path, parents=parents), p.Ok)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.agent.call_expect(p.Remove(path=path, recursive=recursive), p.Ok)

    async def rename(self, src: str, dst: str) -> None:
        await self.agent.call_expect(p.Rename(src=src, dst=dst), p.Ok)

    async def watch_dir(self, path: str, *, recursive: bool = False) -> AgentDirWatch:
        stream = await self.agent.start(p.WatchDir(path=path, recursive=recursive))
        try:
            first = await stream.next(timeout_s=self.agent.request_timeout_s)
        except BaseException:
            stream.close()
            raise
        if not isinstance(first, p.Watching):
            stream.close()
            raise AgentError("unexpected_reply", f"watch_dir got {p.type_name(first)}")
        return AgentDirWatch(stream)
