"""The synchronous SDK: `from tartarus.sync import Sandbox`.

The same calls as the async `tartarus.Sandbox`, without `await`. Each sandbox runs
its async twin on an event loop in a helper thread (an anyio blocking portal), so it
works from scripts, notebooks and threads alike.
"""

from __future__ import annotations

import builtins
import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, overload

from anyio.from_thread import BlockingPortal, start_blocking_portal

from tartarus.api.placement import PlacementRules
from tartarus.api.sandbox import Backend, FileInfo, OnTimeout, SandboxState
from tartarus.api.snapshots import SnapshotEntry
from tartarus.api.types import (
    DEFAULT_TIMEOUT_S,
    CodeContextInfo,
    CodeError,
    CodeExecution,
    CodeLanguage,
    FileWritten,
    LogPage,
    RichResult,
    SandboxInfo,
    SandboxStatsInfo,
)
from tartarus.sdk import sandbox as async_sandbox
from tartarus.sdk.commands import CommandHandle as AsyncCommandHandle
from tartarus.sdk.commands import CommandResult
from tartarus.sdk.pty import PtyHandle as AsyncPtyHandle

P = ParamSpec("P")
T = TypeVar("T")
OutputCallback = Callable[[str], None]

__all__ = ["CommandHandle", "CommandResult", "Sandbox"]


class _Portal:
    """A running event loop in a helper thread, and a way to call into it."""

    def __init__(self) -> None:
        self._cm: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._cm.__enter__()
        self._closed = False

    def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        return self.portal.call(functools.partial(fn, *args, **kwargs))

    def iterate(self, agen: Any) -> Iterator[Any]:
        while True:
            try:
                yield self.portal.call(agen.__anext__)
            except StopAsyncIteration:
                return

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cm.__exit__(None, None, None)


class CommandHandle:
    def __init__(self, portal: _Portal, handle: AsyncCommandHandle) -> None:
        self._portal = portal
        self._handle = handle
        self.pid = handle.pid

    def wait(self) -> CommandResult:
        return self._portal.call(self._handle.wait)

    def send_stdin(self, data: str | bytes) -> None:
        self._portal.call(self._handle.send_stdin, data)

    def close_stdin(self) -> None:
        self._portal.call(self._handle.close_stdin)

    def kill(self, signal: int = 9) -> None:
        self._portal.call(self._handle.kill, signal)


class PtyHandle(CommandHandle):
    _handle: AsyncPtyHandle

    def output(self) -> Iterator[bytes]:
        return self._portal.iterate(self._handle.output())

    def resize(self, rows: int, cols: int) -> None:
        self._portal.call(self._handle.resize, rows, cols)


class Commands:
    def __init__(self, portal: _Portal, sb: async_sandbox.Sandbox) -> None:
        self._portal = portal
        self._commands = sb.commands

    @overload
    def run(
        self,
        cmd: str | list[str],
        *,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        stdin: str | None = None,
    ) -> CommandResult: ...

    @overload
    def run(
        self,
        cmd: str | list[str],
        *,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        stdin: str | None = None,
    ) -> CommandHandle: ...

    def run(
        self,
        cmd: str | list[str],
        *,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        stdin: str | None = None,
    ) -> CommandResult | CommandHandle:
        """See `tartarus.Sandbox.commands.run`; callbacks run on the SDK's helper thread."""
        result = self._portal.call(
            self._commands.run,  # type: ignore[arg-type]
            cmd,
            background=background,
            envs=envs,
            cwd=cwd,
            user=user,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            timeout=timeout,
            stdin=stdin,
        )
        if isinstance(result, AsyncCommandHandle):
            return CommandHandle(self._portal, result)
        return result

    def kill(self, pid: int, signal: int = 9) -> None:
        self._portal.call(self._commands.kill, pid, signal)

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        self._portal.call(self._commands.send_stdin, pid, data)

    def connect(self, pid: int) -> CommandHandle:
        return CommandHandle(self._portal, self._commands.connect(pid))


class Files:
    def __init__(self, portal: _Portal, sb: async_sandbox.Sandbox) -> None:
        self._portal = portal
        self._files = sb.files

    @overload
    def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        return self._portal.call(self._files.read, path, format=format)  # type: ignore[arg-type]

    def write(self, path: str, data: str | bytes, *, mode: int = 0o644) -> FileWritten:
        return self._portal.call(self._files.write, path, data, mode=mode)

    def upload(self, local: Path | str, path: str) -> FileWritten:
        return self._portal.call(self._files.upload, local, path)

    def download(self, path: str, local: Path | str) -> int:
        return self._portal.call(self._files.download, path, local)

    def list(self, path: str = "/") -> list[FileInfo]:
        return self._portal.call(self._files.list, path)

    def get_info(self, path: str) -> FileInfo:
        return self._portal.call(self._files.get_info, path)

    def exists(self, path: str) -> bool:
        return self._portal.call(self._files.exists, path)

    def remove(self, path: str, *, recursive: bool = True) -> None:
        self._portal.call(self._files.remove, path, recursive=recursive)

    def rename(self, old_path: str, new_path: str) -> FileInfo:
        return self._portal.call(self._files.rename, old_path, new_path)

    def make_dir(self, path: str) -> bool:
        return self._portal.call(self._files.make_dir, path)


class Pty:
    def __init__(self, portal: _Portal, sb: async_sandbox.Sandbox) -> None:
        self._portal = portal
        self._pty = sb.pty

    def create(
        self,
        *,
        rows: int = 24,
        cols: int = 80,
        cmd: str | list[str] = "exec /bin/sh -i",
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> PtyHandle:
        handle = self._portal.call(
            self._pty.create, rows=rows, cols=cols, cmd=cmd, cwd=cwd, envs=envs, timeout=timeout
        )
        return PtyHandle(self._portal, handle)

    def resize(self, pid: int, rows: int, cols: int) -> None:
        self._portal.call(self._pty.resize, pid, rows, cols)

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        self._portal.call(self._pty.send_stdin, pid, data)

    def kill(self, pid: int) -> None:
        self._portal.call(self._pty.kill, pid)


class Sandbox:
    """A sandbox on a Tartarus server; `with Sandbox.create(...) as sb:` kills it at the end."""

    def __init__(self, portal: _Portal, sb: async_sandbox.Sandbox) -> None:
        self._portal = portal
        self._sb = sb
        self.id = sb.id
        # The name E2B's SDK uses.
        self.sandbox_id = sb.id
        self.commands = Commands(portal, sb)
        self.files = Files(portal, sb)
        self.pty = Pty(portal, sb)

    def __repr__(self) -> str:
        return repr(self._sb)

    @property
    def info(self) -> SandboxInfo:
        return self._sb.info

    @classmethod
    def create(
        cls,
        template: str = "base",
        *,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        backend: Backend | str = Backend.AUTO,
        vcpus: float | None = None,
        memory_mib: int | None = None,
        network: bool = False,
        trusted: bool = False,
        secrets: dict[str, str] | None = None,
        placement: PlacementRules | None = None,
        from_snapshot: str | None = None,
        checkpoint_on_stop: bool = False,
        on_timeout: OnTimeout | str | None = None,
        auto_pause_after: float | None = None,
        stop_grace: float | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> Sandbox:
        portal = _Portal()
        try:
            creating = async_sandbox.Sandbox.create(
                template,
                timeout=timeout,
                envs=envs,
                metadata=metadata,
                backend=backend,
                vcpus=vcpus,
                memory_mib=memory_mib,
                network=network,
                trusted=trusted,
                secrets=secrets,
                placement=placement,
                from_snapshot=from_snapshot,
                checkpoint_on_stop=checkpoint_on_stop,
                on_timeout=on_timeout,
                auto_pause_after=auto_pause_after,
                stop_grace=stop_grace,
                url=url,
                api_key=api_key,
            )

            async def make() -> async_sandbox.Sandbox:
                return await creating

            return cls(portal, portal.call(make))
        except BaseException:
            portal.close()
            raise

    @classmethod
    def connect(
        cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None
    ) -> Sandbox:
        portal = _Portal()
        try:
            return cls(
                portal,
                portal.call(async_sandbox.Sandbox.connect, sandbox_id, url=url, api_key=api_key),
            )
        except BaseException:
            portal.close()
            raise

    @classmethod
    def list(
        cls,
        *,
        state: list[SandboxState] | None = None,
        metadata: dict[str, str] | None = None,
        template: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> list[SandboxInfo]:
        portal = _Portal()
        try:
            return portal.call(
                async_sandbox.Sandbox.list,
                state=state,
                metadata=metadata,
                template=template,
                url=url,
                api_key=api_key,
            )
        finally:
            portal.close()

    def get_info(self) -> SandboxInfo:
        return self._portal.call(self._sb.get_info)

    def is_running(self) -> bool:
        return self._portal.call(self._sb.is_running)

    def set_timeout(self, timeout: float) -> None:
        self._portal.call(self._sb.set_timeout, timeout)

    def stats(self) -> SandboxStatsInfo:
        return self._portal.call(self._sb.stats)

    def pause(self) -> None:
        """See `tartarus.sdk.Sandbox.pause`."""
        self._portal.call(self._sb.pause)

    def resume(self) -> None:
        self._portal.call(self._sb.resume)

    def get_host(self, port: int) -> str:
        """See `tartarus.sdk.Sandbox.get_host`."""
        return self._portal.call(self._sb.get_host, port)

    def run_code(
        self,
        code: str,
        *,
        language: CodeLanguage | None = None,
        context: CodeContextInfo | str | None = None,
        on_stdout: Callable[[str], None] | None = None,
        on_stderr: Callable[[str], None] | None = None,
        on_result: Callable[[RichResult], None] | None = None,
        on_error: Callable[[CodeError], None] | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> CodeExecution:
        """See `tartarus.Sandbox.run_code` (the callbacks run on the SDK's thread)."""
        return self._portal.call(
            self._sb.run_code,
            code,
            language=language,
            context=context,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_result=on_result,
            on_error=on_error,
            envs=envs,
            timeout=timeout,
        )

    def create_code_context(
        self, *, cwd: str | None = None, language: CodeLanguage = "python"
    ) -> CodeContextInfo:
        return self._portal.call(self._sb.create_code_context, cwd=cwd, language=language)

    def list_code_contexts(self) -> builtins.list[CodeContextInfo]:
        return self._portal.call(self._sb.list_code_contexts)

    def restart_code_context(self, context: CodeContextInfo | str) -> CodeContextInfo:
        return self._portal.call(self._sb.restart_code_context, context)

    def remove_code_context(self, context: CodeContextInfo | str) -> None:
        self._portal.call(self._sb.remove_code_context, context)

    def logs(self, *, since: int = 0, limit: int = 1000) -> LogPage:
        return self._portal.call(self._sb.logs, since=since, limit=limit)

    def snapshot(self, *, label: str = "", metadata: dict[str, str] | None = None) -> SnapshotEntry:
        """See `tartarus.Sandbox.snapshot`."""
        return self._portal.call(self._sb.snapshot, label=label, metadata=metadata)

    def fork(
        self,
        count: int = 1,
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> builtins.list[Sandbox]:
        """See `tartarus.Sandbox.fork`; each copy has its own connection and helper thread."""
        forks = self._portal.call(self._sb.fork, count, timeout=timeout, metadata=metadata)
        return [Sandbox(_Portal(), fork) for fork in forks]

    def kill(self, *, grace: float | None = None) -> None:
        try:
            self._portal.call(self._sb.kill, grace=grace)
        finally:
            self._portal.close()

    def close(self) -> None:
        """Releases the connection and the helper thread; the sandbox keeps running."""
        try:
            self._portal.call(self._sb.close)
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
        self._portal.call(self._sb.__aexit__, exc_type, exc, tb)
        self._portal.close()
