"""The host side of the agent protocol: one multiplexed connection to `tartarus-agent`.

Works over any anyio byte stream: a unix socket (gVisor, jail), a child's stdio, or a
microVM's hybrid-vsock unix socket after the `CONNECT <port>` preamble.

There is no background reader task, so a client can be created in one task and used
from many (a server's request handlers) without a task group spanning them. Whichever
task is waiting for a reply reads the next frame and files it under its request id;
the others wait for their turn. Reads are cancellation-safe: bytes already received stay
buffered for the next reader. Frames for a request nobody is waiting on are queued up to
a byte bound; past it, the oldest output chunks are dropped and counted, like the
agent's own bounded buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar, cast

import anyio
import anyio.abc
from anyio.streams.stapled import StapledByteStream

from tartarus.runtime import protocol as p
from tartarus.runtime.base import SandboxError

CLIENT_NAME: Final = "tartarus-py"
DEFAULT_REQUEST_TIMEOUT_S: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
# Queued-but-unread frames per request before old output chunks are dropped.
DEFAULT_STREAM_BUFFER_BYTES: Final = 16 << 20
# The agent may give requests it already received 2 s to answer (on a connection it
# listened for; a dialled one does not wait) and flushes for up to 2 s before it closes.
HANG_UP_TIMEOUT_S: Final = 5.0
_RECEIVE_BYTES: Final = 256 << 10
# Longest reply line of the hybrid-vsock `CONNECT` preamble.
_VSOCK_REPLY_MAX: Final = 128

R = TypeVar("R", bound=p._Msg)


class AgentError(SandboxError):
    """The agent refused or failed a request; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class AgentConnectionError(AgentError):
    """The connection to the agent failed or closed."""

    def __init__(self, message: str) -> None:
        super().__init__("connection", message)


def _error_from(reply: p.Error, request: str) -> AgentError:
    return AgentError(reply.code, f"agent {request}: {reply.message} ({reply.code})")


class _Slot:
    """Frames received for one request, not yet consumed."""

    __slots__ = ("bytes", "dropped", "queue")

    def __init__(self) -> None:
        self.queue: deque[tuple[p.Message, int]] = deque()
        self.bytes = 0
        self.dropped = 0


class AgentClient:
    """A connection to one agent. Use `connect_unix`, `connect_hybrid_vsock`, `spawn` or
    `over_stream`; close with `aclose` (or `async with`)."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
        stream_buffer_bytes: int = DEFAULT_STREAM_BUFFER_BYTES,
    ) -> None:
        self._stream = stream
        self.request_timeout_s = request_timeout_s
        self._stream_buffer_bytes = stream_buffer_bytes
        self._buffer = bytearray()
        self._ids = itertools.count(1)
        self._slots: dict[int, _Slot] = {}
        self._send_lock = anyio.Lock()
        self._reading = False
        self._frame_event = anyio.Event()
        self._failure: AgentConnectionError | None = None
        self._last_agent_error: p.Error | None = None
        self._process: anyio.abc.Process | None = None
        self.hello: p.HelloOk | None = None

    # ---- connecting ----

    @classmethod
    async def over_stream(
        cls, stream: anyio.abc.ByteStream, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> AgentClient:
        """Greets the agent on an open stream; closes the stream if that fails."""
        client = cls(stream)
        try:
            await client.handshake(timeout_s=timeout_s)
        except BaseException:
            await client.aclose()
            raise
        return client

    @classmethod
    async def connect_unix(
        cls, path: Path | str, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> AgentClient:
        """Connects to an agent's unix socket, waiting up to `timeout_s` for it to appear
        (the agent may still be starting)."""
        stream = await open_unix_stream(path, timeout_s)
        return await cls.over_stream(stream, timeout_s=timeout_s)

    @classmethod
    async def connect_hybrid_vsock(
        cls, path: Path | str, port: int, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    ) -> AgentClient:
        """Connects through a VMM's hybrid-vsock unix socket: sends `CONNECT <port>\\n`,
        expects `OK ...\\n`, then speaks the protocol to the guest's agent."""
        with anyio.fail_after(timeout_s):
            stream = await open_unix_stream(path, timeout_s)
            try:
                await stream.send(f"CONNECT {port}\n".encode())
                line = bytearray()
                while not line.endswith(b"\n") and len(line) < _VSOCK_REPLY_MAX:
                    line += await stream.receive(1)
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                await stream.aclose()
                raise AgentConnectionError(f"{path}: vsock CONNECT {port} failed: {exc}") from exc
            except BaseException:
                await stream.aclose()
                raise
        if not line.startswith(b"OK") or not line.endswith(b"\n"):
            await stream.aclose()
            reply = line.decode(errors="replace").strip()
            raise AgentConnectionError(
                f"{path}: vsock CONNECT {port} was refused ({reply!r}); is the agent listening"
                f" on vsock port {port}?"
            )
        return await cls.over_stream(stream, timeout_s=timeout_s)

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str | Path],
        *,
        timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        stderr: int | None = None,
    ) -> AgentClient:
        """Starts an agent (`... serve --listen stdio`) and speaks to it over its stdio.
        `aclose` ends the agent."""
        process = await anyio.open_process(
            [str(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
        assert process.stdin is not None and process.stdout is not None
        client = cls(StapledByteStream(process.stdin, process.stdout))
        client._process = process
        try:
            await client.handshake(timeout_s=timeout_s)
        except BaseException:
            await client.aclose()
            raise
        return client

    async def handshake(self, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> p.HelloOk:
        reply = await self.call(
            p.Hello(version=p.PROTOCOL_VERSION, client=CLIENT_NAME),
            timeout_s=timeout_s,
            request_id=0,
        )
        if not isinstance(reply, p.HelloOk):
            raise AgentConnectionError(f"agent answered hello with {p.type_name(reply)}")
        p.check_version(reply.version)
        self.hello = reply
        return reply

    async def aclose(self) -> None:
        self._fail(AgentConnectionError("the connection to the agent was closed"))
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
            if self._process is not None:
                process, self._process = self._process, None
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    async def hang_up(self, timeout_s: float = HANG_UP_TIMEOUT_S) -> bool:
        """Closes in order: sends end-of-file, discards what the agent still sends, and
        waits (up to `timeout_s`) for its end-of-file, which it sends as it lets go of the
        connection. True if it did. (gVisor cannot checkpoint a sandbox while it still
        holds a host socket.)"""
        self._fail(AgentConnectionError("the connection to the agent was closed"))
        released = False
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout_s):
                try:
                    await self._stream.send_eof()
                    while True:
                        if self._reading:  # another task's read ends with this EOF too
                            await self._frame_event.wait()
                            continue
                        self._reading = True
                        try:
                            await self._stream.receive(_RECEIVE_BYTES)
                        finally:
                            self._reading = False
                            self._wake()
                except anyio.EndOfStream:
                    released = True
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    released = True  # the agent reset the connection: it is gone too
            await self.aclose()
        return released

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._failure is not None

    # ---- requests ----

    async def call(
        self, body: p.Request, *, timeout_s: float | None = None, request_id: int | None = None
    ) -> p.Response:
        """Sends one request and returns its single reply; an `Error` reply raises
        `AgentError`. Bounded by `timeout_s` (default: `request_timeout_s`)."""
        pending = await self.start(body, request_id=request_id)
        try:
            return await pending.reply(timeout_s=timeout_s)
        finally:
            pending.close()

    async def call_expect(
        self, body: p.Request, expected: type[R], *, timeout_s: float | None = None
    ) -> R:
        reply = await self.call(body, timeout_s=timeout_s)
        if not isinstance(reply, expected):
            raise AgentError(
                "unexpected_reply",
                f"agent answered {p.type_name(body)} with {p.type_name(reply)}, expected"
                f" {expected.__struct_config__.tag}",
            )
        return reply

    async def start(self, body: p.Request, *, request_id: int | None = None) -> RequestStream:
        """Sends a request and returns its reply stream without waiting: for pipelining
        and for requests that stream (exec, attach, logs)."""
        rid = next(self._ids) if request_id is None else request_id
        self._check_open()
        self._slots[rid] = _Slot()
        try:
            frame = p.encode_frame(p.Envelope(id=rid, body=body))
            async with self._send_lock:
                self._check_open()
                await self._stream.send(frame)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._slots.pop(rid, None)
            self._fail(AgentConnectionError(f"cannot send to the agent: {exc}"))
            raise self._failure from exc  # type: ignore[misc]
        except BaseException:
            self._slots.pop(rid, None)
            raise
        return RequestStream(self, rid, p.type_name(body))

    # ---- the reader ----

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, error: AgentConnectionError) -> None:
        if self._failure is None:
            self._failure = error
        self._wake()

    def _wake(self) -> None:
        event, self._frame_event = self._frame_event, anyio.Event()
        event.set()

    async def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            try:
                chunk = await self._stream.receive(max(_RECEIVE_BYTES, n - len(self._buffer)))
            except anyio.EndOfStream:
                if self._buffer:
                    raise p.TruncatedFrameError(
                        f"the agent closed the connection inside a frame ({len(self._buffer)}"
                        f" of {n} bytes received)"
                    ) from None
                raise
            self._buffer += chunk

    async def _read_frame(self) -> p.Envelope:
        await self._fill(p.HEADER_BYTES)
        length = p.body_length(bytes(self._buffer[: p.HEADER_BYTES]))
        await self._fill(p.HEADER_BYTES + length)
        body = bytes(self._buffer[p.HEADER_BYTES : p.HEADER_BYTES + length])
        del self._buffer[: p.HEADER_BYTES + length]
        return p.decode_body(body)

    async def _next(self, rid: int) -> p.Message:
        """The next frame for request `rid`, reading from the connection if need be."""
        while True:
            slot = self._slots.get(rid)
            if slot is None:
                raise AgentConnectionError(f"request {rid} is closed")
            if slot.queue:
                message, size = slot.queue.popleft()
                slot.bytes -= size
                return message
            self._check_open()
            if self._reading:
                await self._frame_event.wait()
                continue
            self._reading = True
            try:
                envelope = await self._read_frame()
                self._dispatch(envelope)
            except anyio.EndOfStream:
                detail = ""
                if self._last_agent_error is not None:
                    detail = f": {self._last_agent_error.message}"
                self._fail(AgentConnectionError(f"the agent closed the connection{detail}"))
            except p.ProtocolError as exc:
                self._fail(AgentConnectionError(f"bad frame from the agent: {exc}"))
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                self._fail(AgentConnectionError(f"lost the connection to the agent: {exc}"))
            finally:
                self._reading = False
                self._wake()

    def _dispatch(self, envelope: p.Envelope) -> None:
        slot = self._slots.get(envelope.id)
        if slot is None:
            # A connection-level error (id 0 outside the handshake) explains a close.
            if isinstance(envelope.body, p.Error):
                self._last_agent_error = envelope.body
            return  # a late frame for a request nobody waits on any more
        body = envelope.body
        size = len(body.data) if isinstance(body, p.Output | p.Log) else 64
        slot.queue.append((body, size))
        slot.bytes += size
        while slot.bytes > self._stream_buffer_bytes and isinstance(
            slot.queue[0][0], p.Output | p.Log
        ):
            _, old = slot.queue.popleft()
            slot.bytes -= old
            slot.dropped += 1

    def _close_slot(self, rid: int) -> None:
        self._slots.pop(rid, None)


class RequestStream:
    """The replies to one request, in order."""

    def __init__(self, client: AgentClient, rid: int, request: str) -> None:
        self.client = client
        self.id = rid
        self.request = request

    @property
    def dropped(self) -> int:
        """Output chunks this client dropped because nobody read them in time."""
        slot = self.client._slots.get(self.id)
        return slot.dropped if slot is not None else 0

    async def next(self, *, timeout_s: float | None = None) -> p.Response:
        """The next reply; an `Error` reply raises `AgentError`."""
        with anyio.fail_after(timeout_s):
            message = await self.client._next(self.id)
        if isinstance(message, p.Error):
            raise _error_from(message, self.request)
        if not isinstance(message, p.RESPONSE_TYPES):
            raise AgentError("unexpected_reply", f"agent sent a request ({p.type_name(message)})")
        return cast(p.Response, message)

    async def reply(self, *, timeout_s: float | None = None) -> p.Response:
        """The single reply of a one-shot request (bounded by the request timeout)."""
        limit = self.client.request_timeout_s if timeout_s is None else timeout_s
        try:
            return await self.next(timeout_s=limit)
        except TimeoutError:
            raise AgentError(
                "timeout", f"agent {self.request}: no reply within {limit:g} s"
            ) from None

    async def cancel(self) -> None:
        """Asks the agent to stop this request's stream (the process keeps running)."""
        if not self.client.closed:
            with contextlib.suppress(AgentError):
                await self.client.call(p.Cancel(target=self.id))
        self.close()

    def close(self) -> None:
        """Stops listening; later frames for this request are discarded."""
        self.client._close_slot(self.id)


async def open_unix_stream(path: Path | str, timeout_s: float) -> anyio.abc.SocketStream:
    """Connects to a unix socket, retrying until it exists and accepts (an agent that is
    still starting) or `timeout_s` passes."""
    delay = 0.002
    last: OSError | None = None
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                return await anyio.connect_unix(path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                last = exc
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
    raise AgentConnectionError(
        f"cannot connect to the agent at {path} within {timeout_s:g} s: {last}; is the"
        " sandbox running?"
    )
