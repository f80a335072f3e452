"""Typed keys for what handlers find on the application."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

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


# How long the request waited for its sandbox to resume (`Server-Timing: resume`).
RESUMED_IN = web.RequestKey("resumed_in", float)
# The sandbox a request is using, busy (not idle) until the request ends.
SERVING = web.RequestKey("serving", LiveSandbox)


async def live_sandbox(request: web.Request) -> LiveSandbox:
    """The running sandbox the request names. One that is paused resumes first (Hypnos:
    any call that needs it running resumes it), and the reply says how long that took in
    its `Server-Timing` header."""
    manager = request.app[MANAGER]
    sandbox_id = request.match_info["id"]
    wiring = request.app.get(SNAPSHOT_WIRING)
    if wiring is not None and manager.is_paused(sandbox_id):
        # The access middleware imports this module.
        from tartarus.server.access import principal_of  # noqa: PLC0415

        started = time.perf_counter()
        await wiring.pausing.resume(sandbox_id, principal_of(request))
        request[RESUMED_IN] = time.perf_counter() - started
    live = manager.live(sandbox_id)
    if request.get(SERVING) is None:
        request[SERVING] = live
        live.busy += 1
    live.last_active = time.time()
    return live


@web.middleware
async def activity_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A sandbox is busy while a request uses it, a stream or a terminal as long as it
    stays open: auto-pause counts idle time from the end of the last one."""
    try:
        return await handler(request)
    finally:
        live = request.get(SERVING)
        if live is not None:
            live.busy -= 1
            live.last_active = time.time()


async def add_server_timing(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: `Server-Timing: resume;dur=MS` on a reply that resumed."""
    resumed = request.get(RESUMED_IN)
    if resumed is not None:
        response.headers.add("Server-Timing", f"resume;dur={resumed * 1000:.1f}")


def snapshot_wiring(request: web.Request) -> SnapshotWiring:
    """The snapshot service (Nyx); 503 on a server started without it."""
    service = request.app.get(SNAPSHOT_WIRING)
    if service is None:
        raise ApiError(503, "snapshots-unavailable", "this server runs without snapshots (Nyx)")
    return service
