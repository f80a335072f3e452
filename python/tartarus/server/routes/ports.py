"""Inbound ports (Styx): a port inside a sandbox, reached over HTTP and WebSocket through
this server.

- `GET /v1/sandboxes/{id}/ports/{port}`: where to reach it (`PortInfo`: its URL);
- `/v1/sandboxes/{id}/ports/{port}/proxy/{path}`, any method (a WebSocket upgrade on
  GET too): the request goes to `http://<sandbox>:<port>/<path>` on the sandbox's link
  and the answer comes back as it is, streamed both ways.

Authenticated like every route (`sandbox:exec`: reaching a server inside is as good as
running code there); the caller's credentials never reach the sandbox. The sandbox's
server sees `X-Forwarded-Prefix` (the proxy path) to build links with. A sandbox needs a
network link (a grant) for its ports to be reachable; the egress rules still hold for
what it opens itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from tartarus.api.types import Port, PortInfo
from tartarus.auth.rbac import SANDBOX_EXEC
from tartarus.server.context import live_sandbox
from tartarus.server.problems import ApiError
from tartarus.server.relay import CHUNK, passed_headers, relay_response, relay_websocket
from tartarus.server.routing import OCTETS, Reply, RouteTable, reply

routes = RouteTable()

CLIENT: Final = web.AppKey("ports_client", aiohttp.ClientSession)
CONNECT_TIMEOUT_S: Final = 10.0
# A sandbox's server that sends nothing for this long is cut off (a stream that sends
# keeps going).
READ_TIMEOUT_S: Final = 300.0
MAX_WS_MESSAGE: Final = 4 << 20
_WS_HANDSHAKE: Final = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    """The proxy's client (a cleanup context): no decompression, no cookie jar, so
    bytes and headers pass as they are."""
    timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        app[CLIENT] = session
        yield


def _port(request: web.Request) -> int:
    try:
        return msgspec.convert(int(request.match_info["port"]), Port)
    except (ValueError, msgspec.ValidationError):
        raise ApiError(
            404, "not-found", f"{request.match_info['port']!r} is not a port (1-65535)"
        ) from None


def _prefix(sandbox_id: str, port: int) -> str:
    return f"/v1/sandboxes/{sandbox_id}/ports/{port}/proxy"


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/ports/{port}",
    summary="Where a port inside the sandbox is reached",
    tag="ports",
    replies=(Reply(200, PortInfo),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def get_port(request: web.Request) -> web.StreamResponse:
    """The URL that reaches `port` inside the sandbox through this server (HTTP and
    WebSocket; send the same credentials as to the API)."""
    port = _port(request)
    live = await live_sandbox(request)
    await live.sandbox.port_address(port)  # refuses a sandbox without a link
    path = _prefix(live.record.id, port) + "/"
    origin = request.url.origin()
    return reply(PortInfo(sandbox_id=live.record.id, port=port, path=path, url=f"{origin}{path}"))


async def _target(request: web.Request) -> tuple[str, str, CIMultiDict[str]]:
    """The sandbox's URL for this request, and the headers to send it."""
    port = _port(request)
    live = await live_sandbox(request)
    host, target_port = await live.sandbox.port_address(port)
    # The rest of the path as it was sent (decoding it would turn `%2F` into a slash),
    # with its query.
    prefix = _prefix(live.record.id, port)
    if request.raw_path.startswith(prefix + "/"):
        rest = request.raw_path.removeprefix(prefix + "/")
    else:  # an id or port written with escapes: the decoded path, escaped again
        rest = quote(request.match_info.get("path", ""), safe="/")
        rest += f"?{request.query_string}" if request.query_string else ""
    url = f"http://{host}:{target_port}/{rest}"
    headers = passed_headers(request.headers, _WS_HANDSHAKE)
    headers["X-Forwarded-Prefix"] = prefix
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    return live.record.id, url, headers


def _unreachable(sandbox_id: str, request: web.Request, error: Exception) -> ApiError:
    port = request.match_info["port"]
    if isinstance(error, TimeoutError):
        return ApiError(504, "port-timeout", f"port {port} in sandbox {sandbox_id} did not answer")
    return ApiError(
        502,
        "port-unreachable",
        f"nothing answers on port {port} in sandbox {sandbox_id} ({type(error).__name__})",
    )


async def proxy(request: web.Request) -> web.StreamResponse:
    """Passes the request to the sandbox's port and streams its answer back."""
    sandbox_id, url, headers = await _target(request)
    if request.headers.get("Upgrade", "").lower() == "websocket" and request.method == "GET":
        return await _proxy_websocket(request, sandbox_id, url, headers)
    session = request.app[CLIENT]
    body = request.content.iter_chunked(CHUNK) if request.body_exists else None
    try:
        upstream = await session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise _unreachable(sandbox_id, request, e) from e
    async with upstream:
        return await relay_response(request, upstream, f"port {request.match_info['port']}")


async def _proxy_websocket(
    request: web.Request, sandbox_id: str, url: str, headers: CIMultiDict[str]
) -> web.StreamResponse:
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    headers.pop("Sec-WebSocket-Protocol", None)
    try:
        upstream = await request.app[CLIENT].ws_connect(
            url, headers=headers, protocols=protocols, max_msg_size=MAX_WS_MESSAGE
        )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise _unreachable(sandbox_id, request, e) from e
    async with upstream:
        chosen = (upstream.protocol,) if upstream.protocol else ()
        ws = web.WebSocketResponse(protocols=chosen, max_msg_size=MAX_WS_MESSAGE)
        await ws.prepare(request)
        await relay_websocket(ws, upstream)
        return ws


# Every method reaches the sandbox's server; one operation each (operation ids are
# unique), the same handler.
_PROXY_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _register_proxy() -> None:
    for method in _PROXY_METHODS:

        async def handler(request: web.Request) -> web.StreamResponse:
            return await proxy(request)

        handler.__name__ = f"proxy_port_{method.lower()}"
        routes.route(
            method,
            "/v1/sandboxes/{id}/ports/{port}/proxy/{path:.*}",
            summary=f"{method} to a port inside the sandbox",
            tag="ports",
            replies=(Reply(200, media=OCTETS, description="The sandbox's server's answer"),),
            errors=(404, 409, 502, 504),
            permission=SANDBOX_EXEC,
        )(handler)


_register_proxy()
