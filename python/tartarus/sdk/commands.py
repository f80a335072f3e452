"""`sb.commands`: run commands in a sandbox, in the foreground or the background."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

import msgspec

from tartarus.api.types import (
    ExecBody,
    ExecOutcome,
    ExitEvent,
    ExitInfo,
    OutputEvent,
    ProcessEntry,
    ProcessList,
    ProcessStarted,
    StartedEvent,
    StdinBody,
    StreamEvent,
    StreamExecBody,
)
from tartarus.errors import TartarusError
from tartarus.sdk.client import Client

T = TypeVar("T")
# A callback the SDK calls with each piece of output: a function or a coroutine function.
Callback = Callable[[T], Awaitable[None] | None]
OutputCallback = Callback[str]


class CommandStreamError(TartarusError):
    """The server reported an error in the middle of a command's stream."""


class CommandResult(msgspec.Struct, kw_only=True):
    """What a finished command left: its output and how it ended."""

    pid: int
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def error(self) -> str | None:
        """Why the command failed, in words (None when it exited 0)."""
        if self.timed_out:
            return "timed out"
        if self.oom_killed:
            return "killed: out of memory"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        if self.exit_code not in (0, None):
            return f"exited with code {self.exit_code}"
        return None


async def call_back(callback: Callback[T] | None, value: T) -> None:
    if callback is not None:
        result = callback(value)
        if result is not None:
            await result


async def consume(
    events: AsyncIterator[StreamEvent],
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
    pid: int = 0,
) -> CommandResult:
    """Collects a stream of exec events into a result, calling the callbacks on the way."""
    out: list[str] = []
    err: list[str] = []
    exit_info = ExitInfo()
    async for event in events:
        if isinstance(event, OutputEvent):
            if event.stream == "stdout":
                out.append(event.data)
                await call_back(on_stdout, event.data)
            else:
                err.append(event.data)
                await call_back(on_stderr, event.data)
        elif isinstance(event, ExitEvent):
            exit_info = event.exit
        elif isinstance(event, StartedEvent):
            pid = event.pid
        else:
            raise CommandStreamError(f"the command's stream failed: {event.detail}")
    return CommandResult(
        pid=pid,
        stdout="".join(out),
        stderr="".join(err),
        exit_code=exit_info.code,
        signal=exit_info.signal,
        timed_out=exit_info.timed_out,
        oom_killed=exit_info.oom_killed,
        truncated=exit_info.dropped_chunks > 0,
    )


class CommandHandle:
    """A background command: wait for it, write to its stdin, or kill it."""

    def __init__(
        self,
        client: Client,
        sandbox_id: str,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/processes/{pid}"
        self.pid = pid
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr

    async def wait(self) -> CommandResult:
        """Follows the command until it exits (its output so far is replayed first)."""
        events = self._client.events("GET", f"{self._base}/stream")
        return await consume(events, self._on_stdout, self._on_stderr, self.pid)

    async def send_stdin(self, data: str | bytes) -> None:
        text = data.decode() if isinstance(data, bytes) else data
        await self._client.call("POST", f"{self._base}/stdin", json=StdinBody(data=text))

    async def close_stdin(self) -> None:
        await self._client.call("POST", f"{self._base}/stdin", json=StdinBody(eof=True))

    async def kill(self, signal: int = 9) -> None:
        await self._client.call("DELETE", self._base, params={"signal": signal})


class Commands:
    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id
        self._base = f"/v1/sandboxes/{sandbox_id}"

    @overload
    async def run(
        self,
        cmd: str | list[str],
        *,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> CommandResult: ...

    @overload
    async def run(
        self,
        cmd: str | list[str],
        *,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> CommandHandle: ...

    async def run(
        self,
        cmd: str | list[str],
        *,
        background: bool = False,
        envs: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        timeout: float | None = None,
        stdin: str | None = None,
    ) -> CommandResult | CommandHandle:
        """Runs `cmd` (a shell line, or an argv list). Foreground: waits and returns a
        `CommandResult` (a non-zero exit is a result, not an exception), streaming output
        to the callbacks as it comes. Background: returns a `CommandHandle` at once; its
        callbacks run while you `await handle.wait()`."""
        common: dict[str, Any] = {
            "cmd": cmd,
            "env": envs or {},
            "cwd": cwd,
            "user": user,
            "stdin": stdin,
            "timeout_s": timeout,
        }
        if background:
            body = ExecBody(**common, background=True, stdin_open=stdin is None)
            started = await self._client.call(
                "POST", f"{self._base}/exec", ProcessStarted, json=body
            )
            return CommandHandle(
                self._client,
                self._sandbox_id,
                started.pid,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
            )
        if on_stdout is None and on_stderr is None:
            outcome = await self._client.call(
                "POST", f"{self._base}/exec", ExecOutcome, json=ExecBody(**common)
            )
            return CommandResult(
                pid=outcome.pid,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                timed_out=outcome.timed_out,
                oom_killed=outcome.oom_killed,
                truncated=outcome.truncated,
            )
        events = self._client.events(
            "POST",
            f"{self._base}/exec/stream",
            json=StreamExecBody(**common),
        )
        return await consume(events, on_stdout, on_stderr)

    async def list(self) -> list[ProcessEntry]:
        return (await self._client.call("GET", f"{self._base}/processes", ProcessList)).items

    async def kill(self, pid: int, signal: int = 9) -> None:
        await self._client.call(
            "DELETE", f"{self._base}/processes/{pid}", params={"signal": signal}
        )

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        await CommandHandle(self._client, self._sandbox_id, pid).send_stdin(data)

    def connect(
        self,
        pid: int,
        *,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
    ) -> CommandHandle:
        """A handle on a running command (e.g. one started by another client)."""
        return CommandHandle(
            self._client, self._sandbox_id, pid, on_stdout=on_stdout, on_stderr=on_stderr
        )
