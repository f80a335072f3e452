"""A minimal HashiCorp Vault KV version 2 endpoint for tests (Vault itself is not
installable on our build hosts).

It implements what the provider uses of Vault's documented HTTP API: `GET
/v1/<mount>/data/<path>` with an `X-Vault-Token` header, answering
`{"data": {"data": {...}, "metadata": {"version": N, ...}}}`, 404 with
`{"errors": []}` for a missing path and 403 `{"errors": ["permission denied"]}` for a
wrong token; `POST` to the same path writes a new version (`{"data": {...}}`), as
`vault kv put` does.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class FakeVault:
    """Named as a fake: the real service is Vault; this speaks its KV v2 API."""

    token: str
    mount: str = "secret"
    data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    def put(self, path: str, values: dict[str, Any]) -> None:
        self.data.setdefault(path, []).append(values)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/v1/{mount}/data/{path:.+}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        if request.headers.get("X-Vault-Token") != self.token:
            return web.json_response({"errors": ["permission denied"]}, status=403)
        if request.match_info["mount"] != self.mount:
            return web.json_response({"errors": ["no handler for route"]}, status=404)
        path = request.match_info["path"]
        if request.method == "POST":
            body = await request.json()
            self.put(path, body["data"])
            return web.json_response({"data": {"version": len(self.data[path])}})
        versions = self.data.get(path)
        if not versions:
            return web.json_response({"errors": []}, status=404)
        return web.json_response(
            {
                "data": {
                    "data": versions[-1],
                    "metadata": {
                        "created_time": dt.datetime.now(dt.UTC).isoformat(),
                        "deletion_time": "",
                        "destroyed": False,
                        "version": len(versions),
                    },
                }
            }
        )


@asynccontextmanager
async def running_vault(token: str) -> AsyncIterator[FakeVault]:
    vault = FakeVault(token=token)
    runner = web.AppRunner(vault.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    vault.url = f"http://127.0.0.1:{port}"
    try:
        yield vault
    finally:
        await runner.cleanup()
