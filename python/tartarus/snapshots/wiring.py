"""Snapshot wiring (Nyx inside the server): wires snapshots, restores, forks, warm
pools and the checkpoint-on-stop hook into the sandbox manager.

- creates: a request `from_snapshot` is a restore; a request a warm pool can serve is
  a hand-over (`SandboxManager.source`);
- a sandbox that asked for `checkpoint_on_stop` is snapshotted before its teardown
  (`before_teardown`), and a restored sandbox's hold on its snapshot's files is
  released after it (`after_teardown`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from tartarus.api.snapshots import PruneQuery
from tartarus.api.types import CreateSandboxRequest, ResourcesBody
from tartarus.auth.principal import Principal
from tartarus.config import Settings
from tartarus.errors import ConflictError, NotFoundError, SandboxNotRunningError
from tartarus.images.blobs import GcReport
from tartarus.images.oci.image import first_error
from tartarus.node import defaults
from tartarus.node.manager import AcquiredSandbox, LiveSandbox, SandboxManager, new_sandbox_id
from tartarus.node.store import SandboxRecord
from tartarus.runtime.types import Backend, SandboxSpec
from tartarus.snapshots.catalog import SnapshotCatalog, SnapshotPurpose, SnapshotRecord
from tartarus.snapshots.pausing import Pausing
from tartarus.snapshots.pools import ORIGIN, WarmPools, acquired_from_restore, facts_of_live
from tartarus.snapshots.service import (
    SHARED_TENANT,
    Progress,
    SnapshotNotFoundError,
    SnapshotService,
    failures_as,
)

log = logging.getLogger(__name__)

# How many copies a fork restores at once.
FORK_CONCURRENCY = 4


def visible_tenants(caller: Principal) -> tuple[str, ...] | None:
    """The snapshot tenants `caller` may see: its own and the shared ones (all for
    cross-tenant principals)."""
    return None if caller.cross_tenant else (caller.tenant, SHARED_TENANT)


class SnapshotWiring:
    def __init__(self, manager: SandboxManager, service: SnapshotService, pools: WarmPools):
        self.manager = manager
        self.service = service
        self.pools = pools
        manager.source = self
        self.pausing = Pausing(manager, service)
        manager.before_teardown.append(self._checkpoint_on_stop)
        manager.after_teardown.append(self._release)

    @classmethod
    def for_server(
        cls, settings: Settings, manager: SandboxManager, db_path: Path
    ) -> SnapshotWiring:
        """Nyx over the server's state database and the image store's blobs."""
        catalog = SnapshotCatalog(db_path)
        service = SnapshotService(catalog, manager.provider.templates.blobs, manager.provider)
        return cls(manager, service, WarmPools(service, catalog, settings.warm_pools))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SnapshotWiring]:
        """Releases holds left by a previous server, keeps the pools full while the
        block runs, and stops pooled sandboxes after."""
        await self.service.release_orphans()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.pools.run)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.pools.close()
                    self.service.catalog.close()

    # --- creates --------------------------------------------------------------------------

    async def acquire(
        self, request: CreateSandboxRequest, caller: Principal, egress: Sequence[str] = ()
    ) -> AcquiredSandbox | None:
        if request.from_snapshot is None:
            # Pooled sandboxes were made with no egress list: one with a network is no
            # match for a tenant whose policy names one.
            if request.network and egress:
                return None
            return self.pools.claim(request)
        record = self.service.catalog.get(request.from_snapshot)
        tenants = visible_tenants(caller)
        if record is None or (tenants is not None and record.tenant not in tenants):
            raise NotFoundError(str(SnapshotNotFoundError(request.from_snapshot)))
        spec = SandboxSpec(
            id=new_sandbox_id(), metadata=request.metadata, env=request.env, egress=[*egress]
        )
        with failures_as("restore", "restore-failed"):
            restored = await self.service.restore(request.from_snapshot, spec)
        return acquired_from_restore(restored, f"restored from snapshot {request.from_snapshot}")

    # --- snapshots of live sandboxes ------------------------------------------------------

    async def snapshot(
        self,
        sandbox_id: str,
        *,
        purpose: SnapshotPurpose = SnapshotPurpose.USER,
        label: str = "",
        metadata: dict[str, str] | None = None,
    ) -> SnapshotRecord:
        live = self.manager.live(sandbox_id)
        async with live.lock:
            if live.closing:
                raise SandboxNotRunningError(f"sandbox {sandbox_id} is stopping")
            # 409 not-supported for a backend that cannot snapshot at all.
            with failures_as(f"snapshot {sandbox_id}", "snapshot-failed", not_supported_as_is=True):
                return await self.service.take(
                    live.sandbox,
                    facts_of_live(live),
                    purpose=purpose,
                    label=label,
                    metadata=metadata,
                )

    async def fork(
        self,
        sandbox_id: str,
        count: int,
        *,
        caller: Principal,
        timeout_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> tuple[str, list[SandboxRecord]]:
        """Snapshots the sandbox, then starts `count` copies of it; the snapshot is
        deleted once they exist (they hold its files while they live)."""
        original = self.manager.record(sandbox_id)
        snap = await self.snapshot(sandbox_id, purpose=SnapshotPurpose.FORK)
        left = (original.expires_at or time.time() + 300) - time.time()
        request = CreateSandboxRequest(
            template=snap.template,
            timeout_s=timeout_s or max(1.0, left),
            metadata={**original.metadata, **(metadata or {}), "tartarus.forked_from": sandbox_id},
            from_snapshot=snap.id,
        )
        made: dict[int, SandboxRecord] = {}
        # Restores overlap (a restore mostly waits for the backend's processes), a few
        # at a time so a large fork does not swamp the host.
        limiter = anyio.CapacityLimiter(FORK_CONCURRENCY)

        async def copy(index: int) -> None:
            async with limiter:
                made[index], _ = await self.manager.create(request, caller=caller)

        try:
            try:
                async with anyio.create_task_group() as tg:
                    for i in range(count):
                        tg.start_soon(copy, i)
            except BaseExceptionGroup as group:
                raise first_error(group) from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                for record in made.values():
                    await self.manager.delete(record.id, grace_s=0)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.service.delete(snap.id)
        return snap.id, [made[i] for i in range(count)]

    async def build_template(
        self,
        template: str,
        *,
        backend: Backend = Backend.AUTO,
        resources: ResourcesBody | None = None,
        label: str = "",
        progress: Progress | None = None,
    ) -> SnapshotRecord:
        with failures_as(f"snapshot template {template}", "snapshot-failed"):
            record = await self.service.build_template(
                template,
                backend=backend,
                resources=defaults.resources(resources),
                label=label,
                progress=progress,
            )
        self.pools.wake()
        return record

    # --- deleting ---------------------------------------------------------------------------

    async def delete(self, snapshot_id: str) -> GcReport:
        record = self.service.catalog.get(snapshot_id)
        if record is not None and record.purpose is SnapshotPurpose.PAUSE:
            raise ConflictError(
                f"snapshot {snapshot_id} holds paused sandbox {record.source_sandbox}; "
                "resume or delete the sandbox instead",
                slug="snapshot-in-use",
            )
        try:
            return await self.service.delete(snapshot_id)
        except SnapshotNotFoundError as e:
            raise NotFoundError(str(e)) from e

    async def prune(self, body: PruneQuery, caller: Principal) -> tuple[list[str], int]:
        """Deletes the snapshots `caller` may see that match every condition of `body`
        (or only lists them with `dry_run`); returns their ids and the bytes freed."""
        now = time.time()
        matching = self.service.catalog.records(
            template=body.template,
            purposes=tuple(body.purpose),
            tenants=visible_tenants(caller),
        )
        groups: dict[tuple[str, SnapshotPurpose], list[SnapshotRecord]] = {}
        for record in matching:
            if record.purpose is SnapshotPurpose.PAUSE:
                continue  # it is a paused sandbox: it goes with the sandbox
            groups.setdefault((record.template, record.purpose), []).append(record)
        doomed = []
        for records in groups.values():
            # Oldest first: keeping the newest N spares the tail.
            candidates = records[: len(records) - body.keep] if body.keep else records
            for record in candidates:
                if body.older_than_s is None or now - record.created_at > body.older_than_s:
                    doomed.append(record)
        if body.dry_run:
            return [r.id for r in doomed], 0
        removed, report = await self.service.delete_many(doomed)
        return removed, report.freed_bytes

    # --- manager hooks ----------------------------------------------------------------------

    async def _checkpoint_on_stop(self, live: LiveSandbox) -> None:
        if not live.record.checkpoint_on_stop:
            return
        record = await self.service.take(
            live.sandbox,
            facts_of_live(live),
            purpose=SnapshotPurpose.TERMINATE,
            label=f"checkpoint on stop ({live.record.detail})",
        )
        log.info("sandbox %s checkpointed as %s before it stopped", live.record.id, record.id)

    async def _release(self, live: LiveSandbox) -> None:
        if live.attachments.get(ORIGIN) is not None:
            await self.service.release(live.record.id)
