"""The fleet's sandbox records as the coordinator's parts change them.

Every change of a record goes through `Records.update`: when the record has ended, its
tenant's quota share (Minos's hold, shared by every API server) is given back, on every
path that ends a sandbox. `settle_quota` sweeps up holds whose sandbox ended or was
never recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from tartarus.errors import NotFoundError
from tartarus.fleet.state import FleetState
from tartarus.node.store import SandboxRecord
from tartarus.runtime.types import SandboxState


def node_owned(record: SandboxRecord, reported: SandboxRecord) -> SandboxRecord:
    """The fleet's record updated with what the node reports (the node decides state,
    backend, deadline and detail; the fleet keeps identity, placement and order)."""
    return msgspec.structs.replace(
        record,
        revision=max(record.revision, reported.revision),
        state=reported.state,
        backend=reported.backend,
        backend_reason=reported.backend_reason,
        detail=reported.detail,
        expires_at=reported.expires_at,
        ended_at=reported.ended_at,
    )


def newer(record: SandboxRecord, reported: SandboxRecord) -> bool:
    """Whether the node's report is newer than what the fleet applied (a report retried
    through an outage may land after a later one)."""
    return reported.revision == 0 or reported.revision > record.revision


def ended(record: SandboxRecord, state: SandboxState, detail: str) -> SandboxRecord:
    """The record ended now in `state`, for `detail`."""
    return msgspec.structs.replace(record, state=state, detail=detail, ended_at=time.time())


class Records:
    def __init__(self, state: FleetState) -> None:
        self.state = state

    async def get(self, sandbox_id: str) -> SandboxRecord:
        record = await self.state.book.get(sandbox_id)
        if record is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return record

    async def tenant_of(self, sandbox_id: str) -> str | None:
        """For the access check: the sandbox's tenant, None if there is no such sandbox."""
        record = await self.state.book.get(sandbox_id)
        return None if record is None else record.tenant

    async def update(
        self, sandbox_id: str, change: Callable[[SandboxRecord], SandboxRecord | None]
    ) -> SandboxRecord | None:
        """Applies `change` to the stored record (None: leave it); gives back the quota
        share of a record that has ended."""
        stored = await self.state.book.update(sandbox_id, change)
        if stored is not None and not stored.live:
            await self.state.quota.release(stored.tenant, stored.id)
        return stored

    async def settle_quota(self, grace_s: float = 60.0) -> int:
        """Gives back holds whose sandbox ended or was never recorded (a server that
        died between admitting and recording); returns how many."""
        released = 0
        cutoff = time.time() - grace_s
        for tenant, holds in (await self.state.quota.holds()).items():
            for sandbox_id, held in holds.items():
                record = await self.state.book.get(sandbox_id)
                if (record is None and held.since < cutoff) or (
                    record is not None and not record.live
                ):
                    await self.state.quota.release(tenant, sandbox_id)
                    released += 1
        return released
