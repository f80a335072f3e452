"""Typed keys for what handlers find on the application."""

from __future__ import annotations

from aiohttp import web

from tartarus.agent.manager import LiveSandbox, SandboxManager

MANAGER = web.AppKey("manager", SandboxManager)
STARTED_AT = web.AppKey("started_at", float)


def manager(request: web.Request) -> SandboxManager:
    return request.app[MANAGER]


def live_sandbox(request: web.Request) -> LiveSandbox:
    return request.app[MANAGER].live(request.match_info["id"])
