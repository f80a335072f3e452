"""Typed keys for what handlers find on the application."""

from __future__ import annotations

from aiohttp import web

from tartarus.node.manager import LiveSandbox, SandboxManager
from tartarus.server.problems import ApiError
from tartarus.snapshots.wiring import SnapshotWiring

MANAGER = web.AppKey("manager", SandboxManager)
STARTED_AT = web.AppKey("started_at", float)
SNAPSHOT_WIRING = web.AppKey("snapshot_wiring", SnapshotWiring)


def manager(request: web.Request) -> SandboxManager:
    return request.app[MANAGER]


def live_sandbox(request: web.Request) -> LiveSandbox:
    return request.app[MANAGER].live(request.match_info["id"])


def snapshot_wiring(request: web.Request) -> SnapshotWiring:
    """The snapshot service (Nyx); 503 on a server started without it."""
    service = request.app.get(SNAPSHOT_WIRING)
    if service is None:
        raise ApiError(503, "snapshots-unavailable", "this server runs without snapshots (Nyx)")
    return service
