"""What can extend `tartarus serve`: the fleet coordinator and the remote node agent
plug in here rather than into the server's own modules."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from tartarus.node.manager import SandboxManager
from tartarus.server.routing import RouteTable


class ServerPlugin(Protocol):
    def middlewares(self) -> Sequence[Middleware]:
        """Run after the access check, in order, around every handler."""
        ...

    def route_tables(self) -> Sequence[RouteTable]:
        """Extra routes (listed in the OpenAPI document)."""
        ...

    def running(
        self, manager: SandboxManager, app: web.Application
    ) -> AbstractAsyncContextManager[None]:
        """Entered when the app is built, before the server listens; left after the stop
        signal while requests are still served, before sandboxes are stopped."""
        ...
