"""`sb.pty`: terminals in a sandbox, over the server's WebSocket attach.

A pty process is started in the background, so it survives a dropped connection;
`PtyHandle` attaches to it for output, and sends input and resizes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec

from tartarus.api.types import (
    WS_STDERR,
    WS_STDOUT,
    ErrorEvent,
    ExecBody,
    ExitEvent,
    ExitInfo,
    ProcessStarted,
    PtyBody,
    ResizeBody,
    StartedEvent,
)
from tartarus.sdk.client import Client
from tartarus.sdk.commands import CommandHandle, CommandStreamError

if TYPE_CHECKING:
    import aiohttp

DataCallback = Callable[[bytes], Awaitable[None] | None]
_text_events = msgspec.json.Decoder(StartedEvent | ExitEvent | ErrorEvent)


async def ws_frames(
    ws: aiohttp.ClientWebSocketResponse,
) -> AsyncIterator[tuple[int, bytes] | ExitInfo]:
    """(stream, bytes) for output frames, then the ExitInfo; raises on an error frame."""
    import aiohttp  # noqa: PLC0415 - a WebSocket's user has it loaded already

    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            if msg.data:
                yield msg.data[0], msg.data[1:]
        elif msg.type == aiohttp.WSMsgType.TEXT:
            event = _text_events.decode(msg.data)
            if isinstance(event, ExitEvent):
                yield event.exit
                return
            if isinstance(event, ErrorEvent):
                raise CommandStreamError(event.detail)
        else:
            return


class PtyHandle(CommandHandle):
    """A running terminal: iterate its output, send keys, resize, wait, kill."""

    def __init__(self, client: Client, sandbox_id: str, pid: int) -> None:
        super().__init__(client, sandbox_id, pid)
        self._ws_path = f"/v1/sandboxes/{sandbox_id}/processes/{pid}/ws"
        self.exit: ExitInfo | None = None

    async def output(self) -> AsyncIterator[bytes]:
        """The terminal's output (replayed from the start, then live) until it exits."""
        ws = await self._client.websocket(self._ws_path)
        async with ws:
            async for frame in ws_frames(ws):
                if isinstance(frame, ExitInfo):
                    self.exit = frame
                    return
                stream, data = frame
                if stream in (WS_STDOUT, WS_STDERR):
                    yield data

    async def wait_output(self, on_data: DataCallback | None = None) -> ExitInfo:
        async for data in self.output():
            if on_data is not None:
                result = on_data(data)
                if result is not None:
                    await result
        return self.exit or ExitInfo()

    async def resize(self, rows: int, cols: int) -> None:
        await self._client.call(
            "POST", f"{self._base}/resize", json=ResizeBody(rows=rows, cols=cols)
        )


class Pty:
    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._sandbox_id = sandbox_id

    async def create(
        self,
        *,
        rows: int = 24,
        cols: int = 80,
        cmd: str | list[str] = "exec /bin/sh -i",
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> PtyHandle:
        """Starts `cmd` on a new terminal (an interactive shell by default)."""
        env = {"TERM": "xterm-256color", **(envs or {})}
        body = ExecBody(
            cmd=cmd,
            env=env,
            cwd=cwd,
            pty=PtyBody(rows=rows, cols=cols),
            timeout_s=timeout,
            background=True,
            stdin_open=True,
        )
        started = await self._client.call(
            "POST", f"/v1/sandboxes/{self._sandbox_id}/exec", ProcessStarted, json=body
        )
        return PtyHandle(self._client, self._sandbox_id, started.pid)

    async def resize(self, pid: int, rows: int, cols: int) -> None:
        await PtyHandle(self._client, self._sandbox_id, pid).resize(rows, cols)

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        await PtyHandle(self._client, self._sandbox_id, pid).send_stdin(data)

    async def kill(self, pid: int) -> None:
        await PtyHandle(self._client, self._sandbox_id, pid).kill()
