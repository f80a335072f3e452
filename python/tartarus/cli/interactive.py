"""Interactive exec for the CLI: the local terminal wired to a command in a sandbox over
the server's WebSocket, raw mode and window resizes included when stdin is a terminal."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import sys
import termios
import tty
from collections.abc import Iterator

import anyio
import msgspec

from tartarus.api.types import WS_STDERR, ExitInfo, PtyBody, StreamExecBody, WsEof, WsResize
from tartarus.sdk.client import Client
from tartarus.sdk.pty import ws_frames

_encoder = msgspec.json.Encoder()


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _pollable(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def read_stdin(fd: int) -> bytes:
    """Terminals, pipes and sockets are polled (a read that waits forever must not hold a
    thread that would keep the process from exiting); files and /dev/null cannot be
    polled but never block for long, so they are read on a worker thread."""
    if _pollable(fd):
        await anyio.wait_readable(fd)
        return os.read(fd, 65536)
    return await anyio.to_thread.run_sync(os.read, fd, 65536)


def terminal_size() -> PtyBody:
    size = shutil.get_terminal_size()
    return PtyBody(rows=max(1, min(size.lines, 1000)), cols=max(1, min(size.columns, 1000)))


async def interactive_exec(
    client: Client,
    sandbox_id: str,
    cmd: str | list[str],
    *,
    tty_mode: bool,
    env: dict[str, str],
    cwd: str | None,
) -> ExitInfo:
    """Runs `cmd` with our stdin/stdout/stderr attached; returns how it ended."""
    body = StreamExecBody(
        cmd=cmd,
        env=({"TERM": os.environ.get("TERM", "xterm-256color")} | env) if tty_mode else env,
        cwd=cwd,
        pty=terminal_size() if tty_mode else None,
    )
    ws = await client.websocket(f"/v1/sandboxes/{sandbox_id}/exec/ws")
    exit_info = ExitInfo(code=None)
    stdin_fd = sys.stdin.fileno()
    async with ws:
        await ws.send_str(_encoder.encode(body).decode())
        with raw_terminal(stdin_fd) if tty_mode else contextlib.nullcontext():
            async with anyio.create_task_group() as tg:

                async def pump_stdin() -> None:
                    while True:
                        data = await read_stdin(stdin_fd)
                        if not data:
                            await ws.send_str(_encoder.encode(WsEof()).decode())
                            return
                        await ws.send_bytes(data)

                async def pump_resizes() -> None:
                    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
                        async for _ in signals:
                            size = terminal_size()
                            resize = WsResize(rows=size.rows, cols=size.cols)
                            await ws.send_str(_encoder.encode(resize).decode())

                tg.start_soon(pump_stdin)
                if tty_mode:
                    tg.start_soon(pump_resizes)
                async for frame in ws_frames(ws):
                    if isinstance(frame, ExitInfo):
                        exit_info = frame
                        break
                    stream, data = frame
                    out = sys.stderr.buffer if stream == WS_STDERR else sys.stdout.buffer
                    out.write(data)
                    out.flush()
                tg.cancel_scope.cancel()
    return exit_info
