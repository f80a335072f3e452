"""A small HTTP/1.1 client on anyio and h11, for requests to a local socket or plain HTTP.

It carries the SDK's ordinary requests (JSON calls, NDJSON and SSE streams, downloads)
and costs a few milliseconds to import where aiohttp costs tens to hundreds, which is
most of a short CLI command's time. Each request has its own connection: on a unix
socket or loopback a connection is cheaper than a pool. aiohttp still does what this
does not: TLS, WebSockets and streamed uploads (`tartarus.sdk.client` picks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from types import TracebackType

import anyio
import anyio.abc
import h11

from tartarus.endpoint import Endpoint
from tartarus.errors import TartarusError

READ_SIZE = 64 * 1024


class WireError(TartarusError, ConnectionError):
    """The connection failed or broke (a server that went away mid-answer), or the server
    broke the protocol."""


class WireUnreachableError(WireError):
    """Nothing accepts connections at the endpoint."""


class Headers(Mapping[str, str]):
    """Response headers, looked up without regard to case (as HTTP names them)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._by_name = {name.lower(): value for name, value in pairs}

    def __getitem__(self, name: str) -> str:
        return self._by_name[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


class Body:
    """A response body, read as it arrives: by lines (`async for`), by chunks, or whole."""

    def __init__(self, response: WireResponse, line_limit: int) -> None:
        self._response = response
        self._line_limit = line_limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Lines, each with its newline (the last may lack one). Each byte is searched
        and kept once: a long line in many reads, or many lines in one, costs no more
        than the bytes themselves."""
        pending = bytearray()
        async for data in self._response.data():
            scan = len(pending)  # what is pending holds no newline
            pending += data
            start = 0
            while (end := pending.find(b"\n", scan)) >= 0:
                yield bytes(pending[start : end + 1])
                start = scan = end + 1
            del pending[:start]
            if len(pending) > self._line_limit:
                raise WireError(f"a line of the response is over {self._line_limit} bytes")
        if pending:
            yield bytes(pending)

    async def iter_chunked(self, size: int) -> AsyncIterator[bytes]:
        async for data in self._response.data():
            for at in range(0, len(data), size):
                yield data[at : at + size]


class WireResponse:
    """The status and headers of a response, and its body to read (then close)."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        conn: h11.Connection,
        response: h11.Response,
        line_limit: int,
    ) -> None:
        self._stream = stream
        self._conn = conn
        self.status: int = response.status_code
        self.headers = Headers(
            (name.decode(), value.decode(errors="replace")) for name, value in response.headers
        )
        self.content = Body(self, line_limit)
        self._done = False
        self._closed = False

    async def data(self) -> AsyncIterator[bytes]:
        while not self._done:
            event = await _next_event(self._stream, self._conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:  # pragma: no cover - h11 sends nothing else after the response
                raise WireError(f"unexpected {type(event).__name__} in the response body")

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.data()])

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        """Ends the request (its connection is its own). Synchronous, as aiohttp's is:
        the connection is closed by a task of the running loop."""
        if self._closed:
            return
        self._closed = self._done = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop left: the socket goes with the stream
        task = loop.create_task(self._stream.aclose())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = self._done = True
            await self._stream.aclose()

    async def __aenter__(self) -> WireResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# Closes in flight (a task must be referenced until it is done).
_CLOSING: set[asyncio.Task[None]] = set()


async def _next_event(stream: anyio.abc.ByteStream, conn: h11.Connection) -> object:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise WireError(f"the server broke HTTP/1.1: {e}") from e
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            data = b""
        if not data:
            try:
                conn.receive_data(b"")
            except h11.RemoteProtocolError as e:  # pragma: no cover - h11 raises on next
                raise WireError(str(e)) from e
            if conn.their_state is h11.CLOSED or conn.their_state is h11.ERROR:
                raise WireError("the server closed the connection mid-response")
            continue
        conn.receive_data(data)


async def _response(stream: anyio.abc.ByteStream, conn: h11.Connection) -> h11.Response:
    """The final response's head (a 1xx is skipped)."""
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Response):
            return event
        if not isinstance(event, h11.InformationalResponse):
            raise WireError(f"expected a response, got {type(event).__name__}")


async def _connect(endpoint: Endpoint, timeout_s: float) -> anyio.abc.ByteStream:
    try:
        with anyio.fail_after(timeout_s):
            if endpoint.kind == "unix":
                return await anyio.connect_unix(str(endpoint.path))
            return await anyio.connect_tcp(endpoint.host or "127.0.0.1", endpoint.port or 80)
    except (OSError, TimeoutError) as e:
        raise WireUnreachableError(str(e) or type(e).__name__) from e


async def request(
    endpoint: Endpoint,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str],
    body: bytes | None,
    connect_timeout_s: float,
    line_limit: int,
) -> WireResponse:
    """Sends one request on a connection of its own; returns once the response's status
    and headers have arrived."""
    stream = await _connect(endpoint, connect_timeout_s)
    try:
        conn = h11.Connection(h11.CLIENT)
        host = "localhost" if endpoint.kind == "unix" else endpoint.url.split("://", 1)[1]
        fields = [("Host", host), ("Connection", "close"), *headers.items()]
        if body is not None:
            fields.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=target, headers=fields))
        if body:
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        out = (out or b"") + (conn.send(h11.EndOfMessage()) or b"")
        try:
            await stream.send(out)
        except (anyio.BrokenResourceError, OSError) as e:
            # The server went away before it read the request (a restart).
            raise WireError(f"the server closed the connection: {e or type(e).__name__}") from e
        return WireResponse(stream, conn, await _response(stream, conn), line_limit)
    except BaseException:
        await stream.aclose()
        raise
