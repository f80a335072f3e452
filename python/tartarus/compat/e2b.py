"""E2B's SDK names on Tartarus: change an E2B program's import line and it runs here.

    from e2b_code_interpreter import Sandbox    # before
    from tartarus.compat.e2b import Sandbox     # after

`Sandbox` (blocking) and `AsyncSandbox` have the names, parameters and result shapes of
`e2b` and `e2b_code_interpreter`'s classes, on the Tartarus SDK. What differs is listed in
`DIFFERENCES` (tests/test_e2b_compat.py compares this module with the real packages, and
docs/migrating-from-e2b.md explains each entry). Where E2B's service would be asked
(`api_key`, `domain`), the Tartarus server is: `TARTARUS_URL` and `TARTARUS_API_KEY`, or
the local one.
"""

from __future__ import annotations

import builtins
import collections
import datetime as dt
import inspect
import posixpath
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

from tartarus.api.sandbox import FileInfo, FileKind, SandboxState
from tartarus.api.types import (
    CodeContextInfo,
    CodeError,
    CodeExecution,
    FileWatchEvent,
    ProcessEntry,
    RichResult,
    SandboxInfo,
)
from tartarus.sdk.commands import CommandHandle as _Handle
from tartarus.sdk.commands import CommandResult
from tartarus.sdk.errors import NotFoundError
from tartarus.sdk.files import WatchHandle as _WatchHandle
from tartarus.sdk.sandbox import Sandbox as _Sandbox
from tartarus.sync import _Portal

__all__ = [
    "DIFFERENCES",
    "AsyncSandbox",
    "CommandExitException",
    "CommandResult",
    "Context",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileType",
    "FilesystemEvent",
    "FilesystemEventType",
    "OutputMessage",
    "Result",
    "Sandbox",
    "SandboxInfo",
    "WriteInfo",
]

T = TypeVar("T")

# E2B's defaults: a sandbox lives 300 s; a command and a cell get 60 s.
DEFAULT_SANDBOX_TIMEOUT_S = 300
DEFAULT_COMMAND_TIMEOUT_S = 60.0
# E2B's code interpreter template is a Python one; ours is `python` (`python-ds` adds
# numpy, pandas and matplotlib).
DEFAULT_TEMPLATE = "python"

# What an E2B program cannot do here, by `Class.name` or `Class.name(param)`; each
# entry is explained in docs/migrating-from-e2b.md.
DIFFERENCES: dict[str, str] = {
    "Sandbox.beta_pause": "E2B's beta pause modes: use pause()",
    "Sandbox.create(secure)": "every request needs the server's credentials anyway",
    "Sandbox.create(mcp)": "no MCP gateway inside the sandbox: run `tartarus mcp` beside it",
    "Sandbox.create(network)": "egress rules come from the server's policy",
    "Sandbox.create(iam)": "no cloud IAM roles",
    "Sandbox.create(lifecycle)": "on_timeout and auto-pause are the Tartarus SDK's options",
    "Sandbox.create(volume_mounts)": "no volumes",
    "Sandbox.create(logger)": "use the logging module",
    "Sandbox.create(cpu_count)": "resources come from the template and policy",
    "Sandbox.connect(on_resume)": "a paused sandbox always resumes as it was",
    "Sandbox.create_snapshot": "snapshots are the Tartarus SDK's sb.snapshot()",
    "Sandbox.delete_snapshot": "use the Tartarus SDK's snapshots",
    "Sandbox.list_snapshots": "use the Tartarus SDK's snapshots",
    "Sandbox.fork": "the Tartarus SDK's sb.fork() returns one sandbox",
    "Sandbox.download_url": "no signed URLs: use files.read or `tartarus cp`",
    "Sandbox.upload_url": "no signed URLs: use files.write or `tartarus cp`",
    "Sandbox.get_mcp_token": "no MCP gateway inside the sandbox",
    "Sandbox.get_mcp_url": "no MCP gateway inside the sandbox",
    "Sandbox.get_metrics": "use the Tartarus SDK's sb.stats()",
    "Sandbox.update_network": "network is fixed at create",
    "Sandbox.git": "no git helper: run git with commands.run",
    "Sandbox.pty": "the Tartarus SDK's sb.pty has its own shape",
    "Sandbox.get_info": "the Tartarus SDK's SandboxInfo: `id` (not `sandbox_id`), `template`",
    "Sandbox.list(limit)": "returns every match",
    "Sandbox.list(next_token)": "returns every match",
    "Sandbox.list(order)": "ordered by creation",
    "Sandbox.pause(keep_memory)": "a pause keeps what the backend can (docs/lifecycle.md)",
    "Sandbox.pause(mode)": "a pause keeps what the backend can (docs/lifecycle.md)",
    "Sandbox.pause(strict)": "pausing a paused sandbox is a no-op",
    "Sandbox.connection_config": "E2B's service internals",
    "Sandbox.default_mcp_template": "no MCP gateway inside the sandbox",
    "Sandbox.envd_api_url": "E2B's service internals",
    "Sandbox.envd_direct_url": "E2B's service internals",
    "Sandbox.mcp_port": "no MCP gateway inside the sandbox",
    "Sandbox.sandbox_domain": "E2B's service internals",
    "Sandbox.traffic_access_token": "ports are reached through the server with its credentials",
    "Sandbox.list": "returns a list, not a paginator; `query` filters by metadata and state",
    "Commands.run(shell)": "the command runs under /bin/sh -c",
    "Commands.run(retain_output)": "output is always kept",
    "Commands.connect(retain_output)": "output is always kept",
    "Commands.stream_input": "use send_stdin and close_stdin",
    "Filesystem.read(gzip)": "transfers are not compressed",
    "Filesystem.read(stream_idle_timeout)": "not needed: reads are bounded by the server",
    "Filesystem.read(user)": "files are read as the sandbox's user",
    "Filesystem.write(gzip)": "transfers are not compressed",
    "Filesystem.write(use_octet_stream)": "always an octet stream",
    "Filesystem.write(metadata)": "files carry no metadata",
    "Filesystem.write(user)": "files are written as the sandbox's user",
    "Filesystem.write_files": "call write once per file",
    "Filesystem.watch_dir(timeout)": "the watch lasts until stop() or the directory goes",
    "Filesystem.watch_dir(user)": "as the sandbox's user",
    "Filesystem.watch_dir(include_entry)": "events carry no entry: call get_info",
    "Filesystem.watch_dir(allow_network_mounts)": "no network mounts",
    "Filesystem.list(user)": "files are listed as the sandbox's user",
    "Filesystem.exists(user)": "as the sandbox's user",
    "Filesystem.get_info(user)": "as the sandbox's user",
    "Filesystem.remove(user)": "as the sandbox's user",
    "Filesystem.rename(user)": "as the sandbox's user",
    "Filesystem.make_dir(user)": "as the sandbox's user",
}


class CommandExitException(Exception):
    """A foreground command that exited non-zero (E2B raises; so does this module)."""

    def __init__(self, stderr: str, stdout: str, exit_code: int, error: str | None) -> None:
        self.stderr = stderr
        self.stdout = stdout
        self.exit_code = exit_code
        self.error = error
        super().__init__(f"command exited with code {exit_code} and error:\n{stderr}")


class FileType(Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


@dataclass
class EntryInfo:
    name: str
    type: FileType | None
    path: str
    size: int
    mode: int
    permissions: str
    modified_time: dt.datetime
    owner: str = ""
    group: str = ""
    symlink_target: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class FilesystemEventType(Enum):
    CHMOD = "chmod"
    CREATE = "create"
    REMOVE = "remove"
    RENAME = "rename"
    WRITE = "write"


@dataclass
class FilesystemEvent:
    """A change under a watched directory; `name` is relative to it."""

    name: str
    type: FilesystemEventType
    entry: EntryInfo | None = None


def _fs_event(root: str, event: FileWatchEvent) -> FilesystemEvent | None:
    """E2B's event for ours (None for `overflow`, which E2B has no name for)."""
    if event.kind == "overflow":
        return None
    name = posixpath.relpath(event.path, root) if event.path != root else ""
    return FilesystemEvent(name=name, type=FilesystemEventType(event.kind))


class AsyncWatchHandle:
    """E2B's `AsyncWatchHandle`: events go to `on_event` until `stop()`."""

    def __init__(self, handle: _WatchHandle) -> None:
        self._handle = handle

    async def stop(self) -> None:
        await self._handle.stop()


@dataclass
class WriteInfo:
    name: str
    type: FileType | None
    path: str


@dataclass
class Context:
    id: str
    language: str
    cwd: str


@dataclass
class OutputMessage:
    """One line a cell printed, as `run_code`'s on_stdout / on_stderr get it."""

    line: str
    timestamp: int
    error: bool = False

    def __str__(self) -> str:
        return self.line


# The code interpreter's results are the Tartarus SDK's, which carry E2B's names.
Execution = CodeExecution
Result = RichResult
ExecutionError = CodeError


_FILE_TYPES = {
    FileKind.FILE: FileType.FILE,
    FileKind.DIR: FileType.DIR,
    FileKind.SYMLINK: FileType.SYMLINK,
}


def _entry(info: FileInfo) -> EntryInfo:
    mode = info.mode & 0o7777
    return EntryInfo(
        name=info.name,
        type=_FILE_TYPES.get(info.kind),
        path=info.path,
        size=info.size,
        mode=mode,
        permissions=_permissions(mode),
        modified_time=dt.datetime.fromtimestamp(info.mtime, tz=dt.UTC),
    )


def _permissions(mode: int) -> str:
    bits = "rwxrwxrwx"
    return "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate(bits))


def _checked(result: CommandResult) -> CommandResult:
    if result.exit_code not in (0, None) or result.timed_out or result.signal is not None:
        raise CommandExitException(
            result.stderr, result.stdout, result.exit_code or -1, result.error
        )
    return result


class AsyncCommandHandle:
    """A background command (E2B's `AsyncCommandHandle`)."""

    def __init__(self, handle: _Handle) -> None:
        self._handle = handle
        self.pid = handle.pid

    async def wait(self) -> CommandResult:
        return _checked(await self._handle.wait())

    async def kill(self) -> bool:
        try:
            await self._handle.kill()
        except NotFoundError:
            return False
        return True


class Commands:
    """`sandbox.commands`."""

    def __init__(self, sandbox: _Sandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
        stdin: bool | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        request_timeout: float | None = None,
    ) -> CommandResult | AsyncCommandHandle:
        """Foreground: the result, or CommandExitException for a non-zero exit (as E2B
        does). Background: a handle at once."""
        del request_timeout, stdin  # stdin is always open for a background command
        common: dict[str, Any] = {
            "envs": envs,
            "user": user,
            "cwd": cwd,
            "on_stdout": on_stdout,
            "on_stderr": on_stderr,
            "timeout": timeout or None,
        }
        if background:
            handle = await self._sb.commands.run(cmd, background=True, **common)
            return AsyncCommandHandle(handle)
        result = await self._sb.commands.run(cmd, **common)
        return _checked(result)

    async def list(self, request_timeout: float | None = None) -> builtins.list[ProcessEntry]:
        del request_timeout
        return await self._sb.commands.list()

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        del request_timeout
        try:
            await self._sb.commands.kill(pid)
        except NotFoundError:
            return False
        return True

    async def send_stdin(
        self, pid: int, data: str | bytes, request_timeout: float | None = None
    ) -> None:
        del request_timeout
        await self._sb.commands.send_stdin(pid, data)

    async def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        del request_timeout
        await self._sb.commands.connect(pid).close_stdin()

    async def connect(
        self,
        pid: int,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        request_timeout: float | None = None,
        on_stdout: Callable[[str], Any] | None = None,
        on_stderr: Callable[[str], Any] | None = None,
    ) -> AsyncCommandHandle:
        del timeout, request_timeout
        return AsyncCommandHandle(
            self._sb.commands.connect(pid, on_stdout=on_stdout, on_stderr=on_stderr)
        )


class Filesystem:
    """`sandbox.files`."""

    def __init__(self, sandbox: _Sandbox) -> None:
        self._sb = sandbox

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes"] = "text",
        request_timeout: float | None = None,
    ) -> str | bytes:
        del request_timeout
        if format == "bytes":
            return await self._sb.files.read(path, format="bytes")
        return await self._sb.files.read(path)

    async def write(
        self, path: str, data: str | bytes | IO[Any], request_timeout: float | None = None
    ) -> WriteInfo:
        del request_timeout
        content = data if isinstance(data, str | bytes) else data.read()
        written = await self._sb.files.write(path, content)
        return WriteInfo(
            name=written.path.rsplit("/", 1)[-1], type=FileType.FILE, path=written.path
        )

    async def list(
        self, path: str, depth: int | None = 1, request_timeout: float | None = None
    ) -> builtins.list[EntryInfo]:
        del request_timeout
        entries = [_entry(e) for e in await self._sb.files.list(path)]
        if depth is not None and depth > 1:
            for entry in builtins.list(entries):
                if entry.type is FileType.DIR:
                    entries += await self.list(entry.path, depth - 1)
        return entries

    async def exists(self, path: str, request_timeout: float | None = None) -> bool:
        del request_timeout
        return await self._sb.files.exists(path)

    async def get_info(self, path: str, request_timeout: float | None = None) -> EntryInfo:
        del request_timeout
        return _entry(await self._sb.files.get_info(path))

    async def remove(self, path: str, request_timeout: float | None = None) -> None:
        del request_timeout
        await self._sb.files.remove(path)

    async def rename(
        self, old_path: str, new_path: str, request_timeout: float | None = None
    ) -> EntryInfo:
        del request_timeout
        return _entry(await self._sb.files.rename(old_path, new_path))

    async def make_dir(self, path: str, request_timeout: float | None = None) -> bool:
        del request_timeout
        return await self._sb.files.make_dir(path)

    async def watch_dir(
        self,
        path: str,
        on_event: Callable[[FilesystemEvent], Any],
        on_exit: Callable[[Exception | None], Any] | None = None,
        request_timeout: float | None = None,
        timeout: float | None = 60,
        recursive: bool = False,
    ) -> AsyncWatchHandle:
        """Watches `path` (inotify in the sandbox); returns once the watch is in place."""
        del request_timeout, timeout

        async def forward(event: FileWatchEvent) -> None:
            converted = _fs_event(path.rstrip("/") or "/", event)
            if converted is not None:
                out = on_event(converted)
                if inspect.isawaitable(out):
                    await out

        handle = await self._sb.files.watch_dir(path, forward, recursive=recursive, on_exit=on_exit)
        return AsyncWatchHandle(handle)


# E2B's connection parameters (`**opts`): the key and URL are used, the rest ignored.
_API_PARAMS = frozenset(
    {"api_key", "domain", "api_url", "debug", "request_timeout", "headers", "proxy"}
)


def _server(opts: dict[str, Any]) -> dict[str, Any]:
    """The Tartarus SDK's url and api_key from E2B's connection parameters; anything
    else is a parameter this module does not have (docs/migrating-from-e2b.md)."""
    unknown = sorted(set(opts) - _API_PARAMS)
    if unknown:
        raise TypeError(
            f"tartarus.compat.e2b does not support {', '.join(unknown)} "
            "(docs/migrating-from-e2b.md lists every difference from E2B's SDK)"
        )
    return {"url": opts.get("api_url") or opts.get("domain"), "api_key": opts.get("api_key")}


def _context(info: CodeContextInfo) -> Context:
    return Context(id=info.id, language=info.language, cwd=info.cwd)


class AsyncSandbox:
    """E2B's `AsyncSandbox` (of `e2b` and `e2b_code_interpreter`) on Tartarus."""

    default_template = DEFAULT_TEMPLATE
    default_sandbox_timeout = DEFAULT_SANDBOX_TIMEOUT_S

    def __init__(self, sandbox: _Sandbox) -> None:
        self._sb = sandbox
        self._commands = Commands(sandbox)
        self._files = Filesystem(sandbox)

    @property
    def commands(self) -> Commands:
        return self._commands

    @property
    def files(self) -> Filesystem:
        return self._files

    @property
    def sandbox_id(self) -> str:
        return self._sb.id

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> AsyncSandbox:
        """A new sandbox. Unlike E2B's, it has no network unless
        `allow_internet_access=True` (and the server's policy allows it)."""
        del idempotency_key  # the Tartarus SDK makes one per create and retries with it
        sandbox = await _Sandbox.create(
            template or cls.default_template,
            timeout=timeout or cls.default_sandbox_timeout,
            metadata=metadata,
            envs=envs,
            network=bool(allow_internet_access),
            **_server(opts),
        )
        return cls(sandbox)

    @classmethod
    async def connect(
        cls, sandbox_id: str, timeout: int | None = None, **opts: Any
    ) -> AsyncSandbox:
        sandbox = await _Sandbox.connect(sandbox_id, **_server(opts))
        if sandbox.info.state is SandboxState.PAUSED:
            await sandbox.resume()
        if timeout is not None:
            await sandbox.set_timeout(timeout)
        return cls(sandbox)

    @classmethod
    async def list(
        cls, query: dict[str, Any] | None = None, **opts: Any
    ) -> builtins.list[SandboxInfo]:
        """Running (and paused) sandboxes; `query` may hold `metadata` and `state`."""
        query = query or {}
        states = [SandboxState(s) for s in query.get("state", ["running", "paused"])]
        return await _Sandbox.list(
            state=states,
            metadata=query.get("metadata"),
            **_server(opts),
        )

    async def get_info(self, **opts: Any) -> SandboxInfo:
        _server(opts)
        return await self._sb.get_info()

    async def is_running(self, request_timeout: float | None = None) -> bool:
        del request_timeout
        return await self._sb.is_running()

    async def set_timeout(self, timeout: int, **opts: Any) -> None:
        _server(opts)
        await self._sb.set_timeout(timeout)

    async def get_host(self, port: int) -> str:
        return await self._sb.get_host(port)

    async def pause(self, **opts: Any) -> bool:
        _server(opts)
        await self._sb.pause()
        return True

    async def kill(self, **opts: Any) -> bool:
        _server(opts)
        try:
            await self._sb.kill()
        except NotFoundError:
            return False
        finally:
            await self._sb.close()
        return True

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | None = None,
        on_stdout: Callable[[OutputMessage], Any] | None = None,
        on_stderr: Callable[[OutputMessage], Any] | None = None,
        on_result: Callable[[Result], Any] | None = None,
        on_error: Callable[[ExecutionError], Any] | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_COMMAND_TIMEOUT_S,
        request_timeout: float | None = None,
    ) -> Execution:
        """E2B's `run_code`: the callbacks get output, results and the error as the
        cell runs; `on_stdout`/`on_stderr` get `OutputMessage`s, one per line."""
        del request_timeout

        def lines(callback: Callable[[OutputMessage], Any] | None, error: bool) -> Any:
            if callback is None:
                return None
            return lambda text: callback(OutputMessage(text, time.time_ns(), error=error))

        return await self._sb.run_code(
            code,
            language=language,  # type: ignore[arg-type]
            context=context.id if context is not None else None,
            on_stdout=lines(on_stdout, False),
            on_stderr=lines(on_stderr, True),
            on_result=on_result,
            on_error=on_error,
            envs=envs,
            timeout=timeout or None,
        )

    async def create_code_context(
        self,
        cwd: str | None = None,
        language: str | None = None,
        request_timeout: float | None = None,
    ) -> Context:
        del request_timeout
        info = await self._sb.create_code_context(cwd=cwd, language=language or "python")  # type: ignore[arg-type]
        return _context(info)

    async def list_code_contexts(self) -> builtins.list[Context]:
        return [_context(c) for c in await self._sb.list_code_contexts()]

    async def restart_code_context(self, context: Context | str) -> None:
        await self._sb.restart_code_context(context if isinstance(context, str) else context.id)

    async def remove_code_context(self, context: Context | str) -> None:
        await self._sb.remove_code_context(context if isinstance(context, str) else context.id)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.kill()


# --- the blocking twins ------------------------------------------------------------------
# Each method of a blocking class calls its async twin's on the sandbox's portal (an event
# loop in a helper thread, as `tartarus.sync` does) and has the twin's signature.


class _Blocking:
    _async: type

    def __init__(self, portal: _Portal, inner: Any) -> None:
        self._portal = portal
        self._inner = inner

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, fn in vars(cls._async).items():
            if name.startswith("_") or name in vars(cls) or not inspect.iscoroutinefunction(fn):
                continue
            setattr(cls, name, _blocking_method(name, fn))

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, AsyncCommandHandle):
            return CommandHandle(self._portal, value)
        return value


def _blocking_method(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    def method(self: _Blocking, *args: Any, **kwargs: Any) -> Any:
        return self._wrap(self._portal.call(getattr(self._inner, name), *args, **kwargs))

    method.__name__ = name
    method.__qualname__ = name
    method.__doc__ = fn.__doc__
    method.__wrapped__ = fn  # type: ignore[attr-defined]  # inspect.signature follows it
    return method


class CommandHandle(_Blocking):
    _async = AsyncCommandHandle

    @property
    def pid(self) -> int:
        return int(self._inner.pid)


class SyncCommands(_Blocking):
    _async = Commands


class WatchHandle:
    """E2B's blocking `WatchHandle`: collect events with `get_new_events()`."""

    def __init__(self, portal: _Portal) -> None:
        self._portal = portal
        self._events: collections.deque[FilesystemEvent] = collections.deque()
        self._handle: AsyncWatchHandle | None = None

    def get_new_events(self) -> builtins.list[FilesystemEvent]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def stop(self) -> None:
        if self._handle is not None:
            self._portal.call(self._handle.stop)


class SyncFilesystem(_Blocking):
    _async = Filesystem

    def watch_dir(
        self, path: str, request_timeout: float | None = None, recursive: bool = False
    ) -> WatchHandle:
        del request_timeout
        handle = WatchHandle(self._portal)
        handle._handle = self._portal.call(
            self._inner.watch_dir,
            path,
            handle._events.append,
            recursive=recursive,
        )
        return handle


class Sandbox(_Blocking):
    """E2B's `Sandbox` (blocking) on Tartarus: `Sandbox.create()`, `sbx.run_code(...)`."""

    _async = AsyncSandbox
    default_template = DEFAULT_TEMPLATE
    default_sandbox_timeout = DEFAULT_SANDBOX_TIMEOUT_S

    def __init__(self, portal: _Portal, inner: AsyncSandbox) -> None:
        super().__init__(portal, inner)
        self._commands = SyncCommands(portal, inner.commands)
        self._files = SyncFilesystem(portal, inner.files)

    @property
    def commands(self) -> SyncCommands:
        return self._commands

    @property
    def files(self) -> SyncFilesystem:
        return self._files

    @property
    def sandbox_id(self) -> str:
        return str(self._inner.sandbox_id)

    @classmethod
    def _open(cls, make: Callable[[], Awaitable[AsyncSandbox]]) -> Sandbox:
        portal = _Portal()
        try:
            return cls(portal, portal.call(make))
        except BaseException:
            portal.close()
            raise

    @classmethod
    def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        allow_internet_access: bool | None = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> Sandbox:
        return cls._open(
            lambda: AsyncSandbox.create(
                template,
                timeout,
                metadata,
                envs,
                allow_internet_access,
                idempotency_key,
                **opts,
            )
        )

    @classmethod
    def connect(cls, sandbox_id: str, timeout: int | None = None, **opts: Any) -> Sandbox:
        return cls._open(lambda: AsyncSandbox.connect(sandbox_id, timeout, **opts))

    @classmethod
    def list(cls, query: dict[str, Any] | None = None, **opts: Any) -> builtins.list[SandboxInfo]:
        portal = _Portal()
        try:
            return portal.call(AsyncSandbox.list, query, **opts)
        finally:
            portal.close()

    def kill(self, **opts: Any) -> bool:
        try:
            return bool(self._portal.call(self._inner.kill, **opts))
        finally:
            self._portal.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
