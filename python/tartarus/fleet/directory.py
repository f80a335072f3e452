"""The fleet's sandbox directory (`tartarus.node.directory`): what a fleet's API server
answers for the sandbox routes.

Create, list and get are served from the shared records, so every API server gives the
same answer; a delete ends the sandbox at its node and then in the records; requests for
a sandbox's parts go to the node that runs it (`locate`). The request and response
types are the single-host ones, so clients cannot tell one host from many.
"""

from __future__ import annotations

import msgspec

from tartarus.api.types import CreateSandboxRequest, Problem
from tartarus.auth.principal import Principal
from tartarus.errors import NodeRefusedError
from tartarus.fleet.coordinator import Coordinator
from tartarus.node.store import ListFilter, SandboxRecord
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.nodes import NodeState

_problems = msgspec.json.Decoder(Problem)


def node_refusal(status: int, body: bytes) -> NodeRefusedError:
    """The node's problem as an error of this server (its status, slug and detail)."""
    try:
        problem = _problems.decode(body)
    except msgspec.DecodeError:
        return NodeRefusedError(body.decode(errors="replace"), status=status)
    slug = problem.type.rpartition("/")[2] or None
    return NodeRefusedError(problem.detail, status=status, slug=slug)


class FleetDirectory:
    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        return await self.coordinator.create(request, key, caller)

    async def list(
        self, flt: ListFilter, *, cursor: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        return await self.coordinator.state.book.page(flt, after_seq=cursor, limit=limit)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self.coordinator.record(sandbox_id)

    async def tenant_of(self, sandbox_id: str) -> str | None:
        return await self.coordinator.sandbox_tenant(sandbox_id)

    async def delete(self, sandbox_id: str, *, grace_s: float) -> None:
        coord = self.coordinator
        record = await coord.record(sandbox_id)
        if not record.live:
            return
        node = await coord.node_of(record)
        if node is not None and record.state is not SandboxState.CREATED:
            path = f"/v1/sandboxes/{sandbox_id}" + (f"?grace_s={grace_s}" if grace_s else "")
            status, body = await coord.proxy.call("DELETE", node, path)
            if status >= 400 and status not in (404, 409):
                # The node could not stop it: its problem is the answer.
                raise node_refusal(status, body)
        await coord.deleted(record, node_reached=node is not None)

    async def locate(self, sandbox_id: str) -> NodeState | None:
        return await self.coordinator.running_node(sandbox_id)

    async def readiness(self) -> tuple[dict[str, str], bool]:
        """The shared state's check (this server runs no sandboxes: the nodes do)."""
        try:
            await self.coordinator.state.ping()
        except Exception as e:
            return {"fleet-state": f"failed: {e}"}, False
        return {"fleet-state": "ok"}, True
