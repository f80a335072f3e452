"""Forwards a sandbox's requests to the node agent that runs it.

A node agent serves the same `/v1` API as a single-host server (it is one, with its own
embedded node agent), so forwarding is plain HTTP: the method, path, query and body go
as they came, streamed both ways (exec output, SSE logs, file transfers), with the
node's credentials in place of the client's (the key the node gave when it joined, or
the fleet's token). WebSocket exec and attach are relayed
frame by frame.
"""

from __future__ import annotations

import contextlib
import logging
import ssl

import aiohttp
import anyio
from aiohttp import WSMsgType, web

from tartarus.errors import UpstreamUnreachableError
from tartarus.scheduling.nodes import NodeState

log = logging.getLogger(__name__)

# Headers that belong to one hop (RFC 9110 section 7.6.1) or that we set ourselves.
_HOP = {
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
    "content-length",
}
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 5.0


def _headers(request_headers: object) -> dict[str, str]:
    assert hasattr(request_headers, "items")
    return {k: v for k, v in request_headers.items() if k.lower() not in _HOP}


class NodeProxy:
    """`tls`: how to check nodes that serve https (the fleet's CA, `[auth.tls]
    client_ca`, which also signs the nodes' own certificates)."""

    def __init__(self, token: str, tls: ssl.SSLContext | None = None) -> None:
        self._token = token
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                connector=aiohttp.TCPConnector(ssl=self._tls or True),
                auto_decompress=False,
                max_line_size=32 << 20,
                max_field_size=1 << 16,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _auth(self, node: NodeState) -> str:
        return f"Bearer {node.spec.access_key or self._token}"

    async def call(
        self, method: str, node: NodeState, path_qs: str, *, json: bytes | None = None
    ) -> tuple[int, bytes]:
        """One request to a node, answered in full: (status, body)."""
        base_url, node_id = node.spec.address, node.id
        headers = {"Authorization": self._auth(node)}
        if json is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._client().request(
                method, base_url + path_qs, headers=headers, data=json
            ) as upstream:
                return upstream.status, await upstream.read()
        except aiohttp.ClientError as e:
            raise UpstreamUnreachableError(
                f"node {node_id} does not answer: {e}", slug="node-unreachable", retry_after=2
            ) from e

    async def forward(self, request: web.Request, node: NodeState) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, node)
        base_url, node_id = node.spec.address, node.id
        headers = _headers(request.headers)
        headers["Authorization"] = self._auth(node)
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        try:
            upstream = await self._client().request(
                request.method,
                base_url + request.rel_url.path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except aiohttp.ClientError as e:
            raise UpstreamUnreachableError(
                f"node {node_id} that runs this sandbox does not answer: {e}",
                slug="node-unreachable",
                retry_after=2,
            ) from e
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=_headers(upstream.headers)
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except (aiohttp.ClientError, ConnectionError) as e:
                log.debug("forwarding to node %s ended early: %s", node_id, e)
                return response
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response

    async def _websocket(self, request: web.Request, node: NodeState) -> web.StreamResponse:
        node_id = node.id
        try:
            upstream = await self._client().ws_connect(
                node.spec.address + request.rel_url.path_qs,
                headers={"Authorization": self._auth(node)},
                max_msg_size=1 << 22,
            )
        except aiohttp.ClientError as e:
            raise UpstreamUnreachableError(
                f"node {node_id} does not answer: {e}", slug="node-unreachable"
            ) from e
        client = web.WebSocketResponse(max_msg_size=1 << 22)
        await client.prepare(request)
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
        return client
