"""Forwards a sandbox's requests to the node agent that runs it.

A node agent serves the same `/v1` API as a single-host server (it is one, with its own
embedded node agent), so forwarding is plain HTTP: the method, path, query and body go
as they came, streamed both ways (exec output, SSE logs, file transfers), with the
node's credentials in place of the client's (the key the node gave when it joined, or
the fleet's token). WebSocket exec and attach are relayed
frame by frame.
"""

from __future__ import annotations

import logging
import ssl

import aiohttp
from aiohttp import web

from tartarus.errors import UpstreamUnreachableError
from tartarus.scheduling.nodes import NodeState
from tartarus.server.relay import CHUNK, passed_headers, relay_response, relay_websocket

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0


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
        # The body streams in chunks: its length goes with it.
        headers = passed_headers(request.headers, frozenset({"content-length"}))
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
            return await relay_response(request, upstream, f"node {node_id}")

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
        await relay_websocket(client, upstream)
        return client
