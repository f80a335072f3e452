"""Relaying HTTP and WebSocket traffic to another server, as it is: what the fleet's
forwarding to node agents and the sandboxes' inbound ports have in common.

Hop-by-hop headers (RFC 9110 section 7.6.1) and the caller's credentials never pass;
repeated headers (Set-Cookie) all do; bodies stream both ways in chunks.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import aiohttp
import anyio
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

CHUNK: Final = 64 << 10
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
    }
)


def passed_headers(
    headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """The headers that pass (lower-case names in `drop` do not either, nor those the
    `Connection` header names: they were for this hop too)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in drop and low not in named:
            out.add(name, value)
    return out


async def relay_response(
    request: web.Request, upstream: aiohttp.ClientResponse, what: str
) -> web.StreamResponse:
    """Streams `upstream`'s answer back to `request`'s client. An upstream that breaks
    off mid-answer leaves the client a short body (`what` names it in the log)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(passed_headers(upstream.headers, frozenset({"content-length"})))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
        log.debug("relaying %s ended early: %s", what, e)
        return response
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def relay_websocket(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Relays frames both ways until either side closes, then closes both."""
    async with anyio.create_task_group() as tg:

        async def pump(
            source: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
            sink: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
        ) -> None:
            async for msg in source:
                if msg.type == WSMsgType.TEXT:
                    await sink.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await sink.send_bytes(msg.data)
                else:
                    break
            tg.cancel_scope.cancel()

        tg.start_soon(pump, upstream, client)
        tg.start_soon(pump, client, upstream)
    with anyio.CancelScope(shield=True):
        await upstream.close()
        await client.close()
