"""The sandbox directory: the one interface the server's sandbox routes call.

It answers for a server's sandboxes wherever they run: create, list, get, delete, whose
a sandbox is, where it runs, and what it adds to the server's readiness. A single host
answers from its own manager (`LocalDirectory`); a fleet's API server answers from the
fleet's shared records (`tartarus.fleet.directory`). Requests for one sandbox's parts
(exec, files, logs, ...) are served by the host that runs it: `locate` names that host
when it is another, and the server forwards the request there.
"""

from __future__ import annotations

from typing import Protocol

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.errors import NotFoundError
from tartarus.node.manager import SandboxManager
from tartarus.node.store import ListFilter, SandboxRecord
from tartarus.scheduling.nodes import NodeState


class SandboxDirectory(Protocol):
    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        """Creates and starts a sandbox for `caller`; returns its record and whether it
        replays an earlier create with the same idempotency key (keys are per tenant)."""
        ...

    async def list(
        self, flt: ListFilter, *, cursor: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        """A page of records in creation order, and the cursor of the next page."""
        ...

    async def get(self, sandbox_id: str) -> SandboxRecord:
        """The sandbox's record; NotFoundError if there is none."""
        ...

    async def tenant_of(self, sandbox_id: str) -> str | None:
        """For the access check: the sandbox's tenant, None if there is no such sandbox."""
        ...

    async def delete(self, sandbox_id: str, *, grace_s: float | None) -> None:
        """Stops the sandbox (after `grace_s` of SIGTERM; None: its own `stop_grace_s`);
        an ended one is left as it is."""
        ...

    async def locate(self, sandbox_id: str) -> NodeState | None:
        """The node that runs the sandbox when it is not this server (its requests are
        forwarded there); None when this server serves them itself."""
        ...

    async def readiness(self) -> tuple[dict[str, str], bool]:
        """What the directory adds to the server's readiness checks, and whether it is
        ready."""
        ...


class LocalDirectory:
    """The sandboxes of this host, as its manager holds them."""

    def __init__(self, manager: SandboxManager) -> None:
        self.manager = manager

    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        return await self.manager.create(request, key, caller=caller)

    async def list(
        self, flt: ListFilter, *, cursor: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        return self.manager.list(flt, cursor=cursor, limit=limit)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return self.manager.record(sandbox_id)

    async def tenant_of(self, sandbox_id: str) -> str | None:
        try:
            return self.manager.record(sandbox_id).tenant
        except NotFoundError:
            return None

    async def delete(self, sandbox_id: str, *, grace_s: float | None) -> None:
        await self.manager.delete(sandbox_id, grace_s=grace_s)

    async def locate(self, sandbox_id: str) -> NodeState | None:
        return None

    async def readiness(self) -> tuple[dict[str, str], bool]:
        return {"sandboxes": str(self.manager.live_count())}, True
