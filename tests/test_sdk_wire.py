"""`tartarus.sdk.wire`, the SDK's own HTTP/1.1, against a real aiohttp server on a unix
socket and on loopback TCP: bodies whole, by lines and by chunks, a chunked stream, a
server that breaks off, one that is not there, and a line over the limit."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from tartarus.endpoint import Endpoint
from tartarus.sdk.wire import WireError, WireResponse, WireUnreachableError, request

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def echo(req: web.Request) -> web.Response:
    body = await req.read()
    return web.json_response(
        {
            "method": req.method,
            "path": req.path_qs,
            "body": body.decode(),
            "auth": req.headers.get("Authorization"),
        }
    )


async def lines(req: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(req)
    for i in range(100):
        await response.write(b'{"n": %d}\n' % i)
    await response.write(b"tail-without-newline")
    await response.write_eof()
    return response


async def broken(req: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1000
    await response.prepare(req)
    await response.write(b"x" * 10)
    assert req.transport is not None
    req.transport.close()
    return response


async def long_line(req: web.Request) -> web.Response:
    return web.Response(body=b"y" * 5000)


@pytest.fixture
async def unix_server(tmp_path: Path) -> AsyncIterator[Endpoint]:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/lines", lines)
    app.router.add_get("/broken", broken)
    app.router.add_get("/long", long_line)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "s.sock"
    site = web.UnixSite(runner, str(path))
    await site.start()
    yield Endpoint.unix(path)
    await runner.cleanup()


async def send(
    endpoint: Endpoint, target: str, body: bytes | None = None, limit: int = 1 << 20
) -> WireResponse:
    return await request(
        endpoint,
        "POST" if body is not None else "GET",
        target,
        headers={"Authorization": "Bearer k"},
        body=body,
        connect_timeout_s=5,
        line_limit=limit,
    )


async def test_a_call_and_its_answer(unix_server: Endpoint) -> None:
    response = await send(unix_server, "/echo?a=1&b=%20x", b'{"x": 1}')
    async with response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/json")
        # As aiohttp's: a header is found whatever the case it is asked in.
        assert response.headers.get("Content-Type") == response.headers["CONTENT-TYPE"]
        doc = await response.read()
    assert b'"path": "/echo?a=1&b=%20x"' in doc
    assert b'"body": "{\\"x\\": 1}"' in doc
    assert b'"auth": "Bearer k"' in doc


async def test_a_chunked_stream_by_lines_and_by_chunks(unix_server: Endpoint) -> None:
    response = await send(unix_server, "/lines")
    got = [line async for line in response.content]
    await response.aclose()
    assert got[:2] == [b'{"n": 0}\n', b'{"n": 1}\n']
    assert len(got) == 101 and got[-1] == b"tail-without-newline"
    response = await send(unix_server, "/lines")
    chunks = [c async for c in response.content.iter_chunked(7)]
    await response.aclose()
    assert all(len(c) <= 7 for c in chunks)
    assert b"".join(chunks) == b"".join(got)


async def test_a_server_that_breaks_off_is_an_error(unix_server: Endpoint) -> None:
    response = await send(unix_server, "/broken")
    with pytest.raises(WireError, match="closed connection without sending complete"):
        await response.read()
    await response.aclose()


async def test_a_line_over_the_limit_is_an_error(unix_server: Endpoint) -> None:
    response = await send(unix_server, "/long", limit=1000)
    with pytest.raises(WireError, match="over 1000 bytes"):
        _ = [line async for line in response.content]
    await response.aclose()


async def test_nothing_listening_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(WireUnreachableError):
        await send(Endpoint.unix(tmp_path / "nobody.sock"), "/echo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WireUnreachableError):
        await send(Endpoint.tcp("127.0.0.1", port), "/echo")


async def test_loopback_tcp_and_a_close_without_reading(tmp_path: Path) -> None:
    app = web.Application()
    app.router.add_get("/lines", lines)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        response = await send(Endpoint.tcp("127.0.0.1", port), "/lines")
        first = await anext(aiter(response.content))
        assert first == b'{"n": 0}\n'
        response.close()  # synchronous, as the SDK's NDJSON streams close
        await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()


async def test_a_server_that_hangs_up_before_reading_the_request_is_an_error(
    tmp_path: Path,
) -> None:
    """A restarting server closes connections it has not read: the send fails, and that
    is a `WireError` (which the SDK retries), not the transport's own exception."""
    path = tmp_path / "rude.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    listener.setblocking(False)
    loop = asyncio.get_running_loop()

    async def hang_up() -> None:
        conn, _ = await loop.sock_accept(listener)
        conn.close()

    task = asyncio.create_task(hang_up())
    try:
        with pytest.raises(WireError):
            # Far more than a socket buffer holds, so the send is still going on when
            # the server hangs up.
            await send(Endpoint.unix(path), "/echo", b"z" * (16 << 20))
    finally:
        await task
        listener.close()
