"""Typed keys for what handlers find on the application."""

from __future__ import annotations

from aiohttp import web

from tartarus.agent.manager import LiveSandbox, SandboxManager
from tartarus.server.problems import ApiError
from tartarus.snapshots.nyx import Nyx

MANAGER = web.AppKey("manager", SandboxManager)
STARTED_AT = web.AppKey("started_at", float)
NYX = web.AppKey("nyx", Nyx)


def manager(request: web.Request) -> SandboxManager:
    return request.app[MANAGER]


def live_sandbox(request: web.Request) -> LiveSandbox:
    return request.app[MANAGER].live(request.match_info["id"])


def nyx(request: web.Request) -> Nyx:
    """The snapshot service (Nyx); 503 on a server started without it."""
    service = request.app.get(NYX)
    if service is None:
        raise ApiError(503, "snapshots-unavailable", "this server runs without snapshots (Nyx)")
    return service
