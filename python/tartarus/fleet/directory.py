"""The fleet's sandbox directory (`tartarus.node.directory`): what a fleet's API server
answers for the sandbox routes.

Create goes through the intake (admit, record, queue, wait for a node); list and get
are served from the shared records, so every API server gives the same answer; a
delete ends the sandbox at its node and then in the records; requests for a sandbox's
parts go to the node that runs it (`locate`). The request and response types are the
single-host ones, so clients cannot tell one host from many.
"""

from __future__ import annotations

import msgspec

from tartarus.api.types import CreateSandboxRequest, Problem
from tartarus.auth.principal import Principal
from tartarus.errors import NodeRefusedError, SandboxNotRunningError
from tartarus.fleet.intake import Intake
from tartarus.fleet.proxy import NodeProxy
from tartarus.fleet.records import Records, ended
from tartarus.fleet.state import FleetState
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
    def __init__(
        self, state: FleetState, records: Records, intake: Intake, proxy: NodeProxy
    ) -> None:
        self.state = state
        self.records = records
        self.intake = intake
        self.proxy = proxy

    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        return await self.intake.create(request, key, caller)

    async def list(
        self, flt: ListFilter, *, cursor: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        return await self.state.book.page(flt, after_seq=cursor, limit=limit)

    async def get(self, sandbox_id: str) -> SandboxRecord:
        return await self.records.get(sandbox_id)

    async def tenant_of(self, sandbox_id: str) -> str | None:
        return await self.records.tenant_of(sandbox_id)

    async def delete(self, sandbox_id: str, *, grace_s: float | None) -> None:
        record = await self.records.get(sandbox_id)
        if not record.live:
            return
        node = await self.state.registry.node(record.node) if record.node else None
        if node is not None and record.state is not SandboxState.CREATED:
            path = f"/v1/sandboxes/{sandbox_id}" + (
                f"?grace_s={grace_s}" if grace_s is not None else ""
            )
            status, body = await self.proxy.call("DELETE", node, path)
            if status >= 400 and status not in (404, 409):
                # The node could not stop it: its problem is the answer.
                raise node_refusal(status, body)
        await self._deleted(record, node_reached=node is not None)

    async def _deleted(self, record: SandboxRecord, *, node_reached: bool) -> None:
        """Ends the record of a deleted sandbox; releases its reservation here when no node
        will (it never started, or its node was not reachable)."""
        detail = "deleted" if node_reached else "deleted (its node was not reachable)"
        if record.state is SandboxState.CREATED:
            detail = "deleted before it started"
        await self.records.update(
            record.id, lambda r: ended(r, SandboxState.STOPPED, detail) if r.live else None
        )
        if not node_reached or record.state is SandboxState.CREATED:
            await self.state.registry.release(record.id)

    async def locate(self, sandbox_id: str) -> NodeState | None:
        """The node that runs the sandbox (this server runs none, so never None)."""
        record = await self.records.get(sandbox_id)
        if not record.live or record.state is SandboxState.CREATED or not record.node:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} is {record.state.value}"
                + (f" ({record.detail})" if record.detail else "")
            )
        node = await self.state.registry.node(record.node)
        if node is None:
            raise SandboxNotRunningError(
                f"sandbox {sandbox_id} runs on node {record.node}, which is not reachable"
            )
        return node

    async def readiness(self) -> tuple[dict[str, str], bool]:
        """The shared state's check (this server runs no sandboxes: the nodes do)."""
        try:
            await self.state.ping()
        except Exception as e:
            return {"fleet-state": f"failed: {e}"}, False
        return {"fleet-state": "ok"}, True
