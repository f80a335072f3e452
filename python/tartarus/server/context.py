"""Typed keys for what handlers find on the application."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tartarus.node.directory import SandboxDirectory
from tartarus.node.manager import LiveSandbox, SandboxManager
from tartarus.scheduling.nodes import NodeState
from tartarus.server.problems import ApiError
from tartarus.snapshots.wiring import SnapshotWiring

MANAGER = web.AppKey("manager", SandboxManager)
STARTED_AT = web.AppKey("started_at", float)
SNAPSHOT_WIRING = web.AppKey("snapshot_wiring", SnapshotWiring)
# Where the sandbox routes find sandboxes (this host's manager, or a fleet's records).
DIRECTORY: web.AppKey[SandboxDirectory] = web.AppKey("directory")
# How a request for a sandbox that runs on another node reaches it (a fleet's proxy).
Forward = Callable[[web.Request, NodeState], Awaitable[web.StreamResponse]]
FORWARD: web.AppKey[Forward] = web.AppKey("forward")


def manager(request: web.Request) -> SandboxManager:
    return request.app[MANAGER]


def directory(request: web.Request) -> SandboxDirectory:
    return request.app[DIRECTORY]


def live_sandbox(request: web.Request) -> LiveSandbox:
    return request.app[MANAGER].live(request.match_info["id"])


def snapshot_wiring(request: web.Request) -> SnapshotWiring:
    """The snapshot service (Nyx); 503 on a server started without it."""
    service = request.app.get(SNAPSHOT_WIRING)
    if service is None:
        raise ApiError(503, "snapshots-unavailable", "this server runs without snapshots (Nyx)")
    return service
