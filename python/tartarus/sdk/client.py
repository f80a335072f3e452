"""The HTTP client under the SDK, for one server (unix socket or TCP).

Requests with a body in hand go over `tartarus.sdk.wire` (HTTP/1.1 on h11, cheap to
import) unless the server speaks TLS; WebSockets, TLS and streamed uploads go over one
aiohttp session, imported when first needed. Problems (RFC 9457) become typed
exceptions (`tartarus.sdk.errors`); bodies are encoded and decoded with the API's
msgspec Structs.
"""

from __future__ import annotations

import os
import sys
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import msgspec

from tartarus.api.types import Problem, StreamEvent
from tartarus.codec import enc_hook
from tartarus.endpoint import Endpoint
from tartarus.sdk.errors import ApiError, ServerUnreachableError, error_for
from tartarus.sdk.local import ensure_local_server
from tartarus.sdk.wire import WireError, WireUnreachableError
from tartarus.sdk.wire import request as wire_request

if TYPE_CHECKING:
    import aiohttp

T = TypeVar("T")


class Body(Protocol):
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    def iter_chunked(self, size: int) -> AsyncIterator[bytes]: ...


class Response(Protocol):
    """What the SDK reads of a response, from either transport."""

    status: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> Body: ...

    async def read(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Any: ...


def disconnect_errors() -> tuple[type[BaseException], ...]:
    """The errors of a connection the server dropped (a restart), on either transport:
    a request that fails with one may be sent again."""
    errors: tuple[type[BaseException], ...] = (WireError,)
    if "aiohttp" in sys.modules:
        import aiohttp  # noqa: PLC0415 - loaded already

        errors += (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
    return errors


_encoder = msgspec.json.Encoder(enc_hook=enc_hook)
_events = msgspec.json.Decoder(StreamEvent)
_problems = msgspec.json.Decoder(Problem)

# Generous: a request/response exec lasts as long as its command.
DEFAULT_REQUEST_TIMEOUT_S = None
CONNECT_TIMEOUT_S = 10.0
STREAM_LINE_LIMIT = 32 << 20


class NdjsonStream(Generic[T]):
    """The documents of an NDJSON response, one per line, until the server ends it."""

    def __init__(self, response: Response, decoder: msgspec.json.Decoder[T]) -> None:
        self._response = response
        self._decoder = decoder

    async def __aiter__(self) -> AsyncIterator[T]:
        async for line in self._response.content:
            if line.strip():
                yield self._decoder.decode(line)

    def close(self) -> None:
        self._response.close()


class Client:
    """A connection to one Tartarus server; close it (or use `async with`) when done."""

    def __init__(self, endpoint: Endpoint, *, api_key: str | None = None) -> None:
        self.endpoint = endpoint
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def connect(cls, url: str | None = None, *, api_key: str | None = None) -> Client:
        """A client for `url`, `$TARTARUS_URL`, or the local server (started if needed)."""
        url = url or os.environ.get("TARTARUS_URL")
        api_key = api_key or os.environ.get("TARTARUS_API_KEY")
        if url:
            return cls(Endpoint.parse(url), api_key=api_key)
        # Only a client without a URL needs the configuration (it loads every
        # component's settings): import it here, not with the SDK.
        from tartarus.config import load_settings  # noqa: PLC0415

        return cls(await ensure_local_server(load_settings()), api_key=api_key)

    def copy(self) -> Client:
        """Another client for the same server and API key, with its own connections."""
        return Client(self.endpoint, api_key=self._api_key)

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp  # noqa: PLC0415 - only TLS, WebSockets and uploads need it

        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self.endpoint.kind == "unix":
                connector = aiohttp.UnixConnector(path=str(self.endpoint.path))
            else:
                connector = aiohttp.TCPConnector()
            headers = {"User-Agent": "tartarus-sdk"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._session = aiohttp.ClientSession(
                base_url=self.endpoint.base_url,
                connector=connector,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=DEFAULT_REQUEST_TIMEOUT_S, sock_connect=CONNECT_TIMEOUT_S
                ),
                read_bufsize=1 << 16,
                max_line_size=STREAM_LINE_LIMIT,
                max_field_size=1 << 16,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- requests ------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        body = _encoder.encode(json) if json is not None else data
        hdrs = dict(headers or {})
        if json is not None:
            hdrs["Content-Type"] = "application/json"
        if self.endpoint.tls or not (body is None or isinstance(body, bytes)):
            response: Response = await self._send_aiohttp(method, path, body, params, hdrs)
        else:
            response = await self._send_wire(method, path, body, params, hdrs)
        if response.status >= 400:
            async with response:
                raw = await response.read()
            raise _problem(response.status, raw, response.headers.get("Retry-After"))
        return response

    async def _send_wire(
        self,
        method: str,
        path: str,
        body: bytes | None,
        params: Mapping[str, Any] | None,
        headers: dict[str, str],
    ) -> Response:
        query = _query(params)
        target = path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers.setdefault("User-Agent", "tartarus-sdk")
        if self._api_key:
            headers.setdefault("Authorization", f"Bearer {self._api_key}")
        try:
            return await wire_request(
                self.endpoint,
                method,
                target,
                headers=headers,
                body=body,
                connect_timeout_s=CONNECT_TIMEOUT_S,
                line_limit=STREAM_LINE_LIMIT,
            )
        except WireUnreachableError as e:
            raise ServerUnreachableError(
                f"no Tartarus server answers at {self.endpoint.url}: {e}"
            ) from e

    async def _send_aiohttp(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, Any] | None,
        headers: dict[str, str],
    ) -> Response:
        import aiohttp  # noqa: PLC0415

        try:
            return await self._get_session().request(
                method, path, data=body, params=_query(params), headers=headers
            )
        except aiohttp.ClientConnectorError as e:
            raise ServerUnreachableError(
                f"no Tartarus server answers at {self.endpoint.url}: {e.os_error or e}"
            ) from e

    async def call(
        self,
        method: str,
        path: str,
        type_: type[T] | None = None,
        *,
        json: Any = None,
        data: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        """Sends a request and decodes a JSON answer as `type_` (None: no body)."""
        response = await self._send(
            method, path, json=json, data=data, params=params, headers=headers
        )
        async with response:
            raw = await response.read()
        if type_ is None:
            return None  # type: ignore[return-value]
        return msgspec.json.decode(raw, type=type_)

    def events(self, method: str, path: str, *, json: Any = None) -> AsyncIterator[StreamEvent]:
        """An NDJSON stream of exec events."""
        return self.ndjson(method, path, _events, json=json)

    async def ndjson(
        self,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[T],
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[T]:
        """An NDJSON stream, one document per line, each decoded with `decoder`."""
        stream = await self.open_ndjson(method, path, decoder, json=json, params=params)
        try:
            async for item in stream:
                yield item
        finally:
            stream.close()

    async def open_ndjson(
        self,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[T],
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> NdjsonStream[T]:
        """Sends the request and returns once the server has answered (a problem raises
        here); then iterate the stream and close it."""
        response = await self._send(method, path, json=json, params=params)
        return NdjsonStream(response, decoder)

    async def download(
        self, path: str, params: Mapping[str, Any], chunk_size: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        response = await self._send("GET", path, params=params)
        async with response:
            async for chunk in response.content.iter_chunked(chunk_size):
                yield chunk

    async def upload(
        self, path: str, params: Mapping[str, Any], body: bytes | AsyncIterable[bytes]
    ) -> Response:
        return await self._send(
            "PUT",
            path,
            data=body,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
        )

    async def sse(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[tuple[str, bytes]]:
        """Server-sent events as (event name, data) pairs."""
        response = await self._send("GET", path, params=params)
        async with response:
            name, data = "message", b""
            async for raw in response.content:
                line = raw.rstrip(b"\r\n")
                if not line:
                    if data:
                        yield name, data
                    name, data = "message", b""
                elif line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                elif line.startswith(b"data:"):
                    data += line[5:].strip()

    async def websocket(self, path: str) -> aiohttp.ClientWebSocketResponse:
        import aiohttp  # noqa: PLC0415

        try:
            return await self._get_session().ws_connect(path, max_msg_size=1 << 22)
        except aiohttp.WSServerHandshakeError as e:
            if e.status >= 400:
                # The handshake drops the server's problem document: the same request
                # without the upgrade gets it (and raises it, e.g. "sandbox ... not found").
                (await self._send("GET", path)).release()
            raise error_for(e.status, "about:blank", e.message, str(e)) from e


def _query(params: Mapping[str, Any] | None) -> list[tuple[str, str]] | None:
    """Query pairs; booleans as true/false, lists repeated, None left out."""
    if params is None:
        return None
    out: list[tuple[str, str]] = []
    for key, value in params.items():
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is None:
                continue
            out.append((key, ("true" if v else "false") if isinstance(v, bool) else str(v)))
    return out


def _retry_after(header: str | None) -> float | None:
    """`Retry-After` in seconds (its HTTP-date form is not sent by our servers)."""
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None


def _problem(status: int, raw: bytes, retry_after: str | None = None) -> ApiError:
    wait = _retry_after(retry_after)
    try:
        p = _problems.decode(raw)
    except msgspec.DecodeError:
        return error_for(
            status, "about:blank", f"HTTP {status}", raw[:500].decode(errors="replace"), wait
        )
    return error_for(status, p.type, p.title, p.detail, wait)
