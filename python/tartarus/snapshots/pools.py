"""Warm pools: K sandboxes per template, restored from the template's warm snapshot and
ready, so that creating one is a hand-over instead of a start.

Targets come from the configuration (`[warm_pools]` in tartarus.toml) and the API
(`PUT /v1/pools/{template}`, kept in the state database and winning over the file);
a forecaster can call `set_target` the same way. A background task keeps each pool
full: it builds the template's warm snapshot on first need, restores sandboxes until
the target is met, and stops extras when it shrinks. A failing pool backs off
(doubling up to a minute) and reports its last error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import anyio

from tartarus.api.snapshots import PoolInfo
from tartarus.api.types import CreateSandboxRequest
from tartarus.node import defaults
from tartarus.node.manager import AcquiredSandbox, LiveSandbox, new_sandbox_id
from tartarus.runtime.types import Backend, SandboxSpec
from tartarus.snapshots.catalog import PoolTarget, SnapshotCatalog, SnapshotPurpose, SnapshotRecord
from tartarus.snapshots.service import Restored, SandboxFacts, SnapshotService

log = logging.getLogger(__name__)

# Re-check pools at least this often (a claim or a target change wakes the task early).
TICK_S = 5.0
MAX_BACKOFF_S = 60.0
# Attachment key under which an acquired sandbox carries its origin (see nyx.py).
ORIGIN = "nyx.origin"


def facts_of_live(live: LiveSandbox) -> SandboxFacts:
    r = live.record
    return SandboxFacts(
        template=r.template,
        resources=r.resources,
        network=r.network,
        trust=r.trust,
        origin=live.attachments.get(ORIGIN),
        tenant=r.tenant,
    )


def acquired_from_restore(restored: Restored, reason: str) -> AcquiredSandbox:
    """A restored copy, handed to the manager as a create's sandbox; ORIGIN remembers
    the snapshot it came from."""
    sandbox, runtime, facts, workdir = restored
    return AcquiredSandbox(
        sandbox=sandbox,
        runtime=runtime,
        template=facts.template,
        resources=facts.resources,
        network=facts.network,
        trust=facts.trust,
        reason=reason,
        attachments={ORIGIN: facts.origin},
        workdir=workdir,
    )


@dataclass(eq=False)
class Pool:
    target: PoolTarget
    ready: list[AcquiredSandbox] = field(default_factory=list)
    snapshot: SnapshotRecord | None = None
    hits: int = 0
    misses: int = 0
    last_error: str = ""
    failures: int = 0
    retry_at: float = 0.0

    def info(self) -> PoolInfo:
        return PoolInfo(
            template=self.target.template,
            target=self.target.size,
            ready=len(self.ready),
            backend=self.snapshot.backend if self.snapshot else self.target.backend,
            snapshot_id=self.snapshot.id if self.snapshot else None,
            hits=self.hits,
            misses=self.misses,
            last_error=self.last_error,
        )


class WarmPools:
    def __init__(
        self,
        service: SnapshotService,
        catalog: SnapshotCatalog,
        configured: dict[str, int] | None = None,
    ) -> None:
        self.service = service
        self.catalog = catalog
        self._pools: dict[str, Pool] = {}
        for template, size in (configured or {}).items():
            self._pools[template] = Pool(PoolTarget(template=template, size=size))
        for target in catalog.pools():
            self._pools[target.template] = Pool(target)
        self._wake = anyio.Event()

    # --- queries and targets -------------------------------------------------------------

    def status(self) -> list[PoolInfo]:
        return [p.info() for _, p in sorted(self._pools.items())]

    def pool(self, template: str) -> PoolInfo | None:
        p = self._pools.get(template)
        return None if p is None else p.info()

    def set_target(self, template: str, size: int, backend: Backend = Backend.AUTO) -> PoolInfo:
        """Keeps `size` ready sandboxes of `template` from now on (0 empties the pool)."""
        target = self.catalog.set_pool(PoolTarget(template=template, size=size, backend=backend))
        pool = self._pools.get(template)
        if pool is None:
            pool = self._pools[template] = Pool(target)
        else:
            if pool.target.backend != backend:
                pool.snapshot = None
            pool.target = target
            pool.failures = 0
            pool.retry_at = 0.0
        self.wake()
        return pool.info()

    def wake(self) -> None:
        self._wake.set()

    # --- hand-over -------------------------------------------------------------------------

    def claim(self, request: CreateSandboxRequest) -> AcquiredSandbox | None:
        """A ready sandbox that is exactly what `request` asks for, or None."""
        pool = self._pools.get(request.template)
        if pool is None or pool.target.size == 0:
            return None
        if not pool.ready or not _fits(request, pool):
            pool.misses += 1
            self.wake()
            return None
        pool.hits += 1
        acquired = pool.ready.pop(0)
        self.wake()
        return acquired

    # --- keeping pools full ----------------------------------------------------------------

    async def run(self) -> None:
        """Keeps every pool at its target until cancelled."""
        while True:
            self._wake = anyio.Event()
            for pool in list(self._pools.values()):
                await self._refill(pool)
            delay = TICK_S
            pending = [p.retry_at for p in self._pools.values() if p.failures]
            if pending:
                delay = max(0.05, min(delay, min(pending) - time.time()))
            with anyio.move_on_after(delay):
                await self._wake.wait()

    async def _refill(self, pool: Pool) -> None:
        while len(pool.ready) > pool.target.size:
            await self._discard(pool.ready.pop())
        if len(pool.ready) >= pool.target.size or time.time() < pool.retry_at:
            return
        try:
            if pool.snapshot is None or self.catalog.get(pool.snapshot.id) is None:
                pool.snapshot = await self._warm_snapshot(pool.target)
            while len(pool.ready) < pool.target.size:
                pool.ready.append(await self._restore(pool.snapshot))
        except Exception as e:
            pool.failures += 1
            pool.retry_at = time.time() + min(MAX_BACKOFF_S, 2 ** (pool.failures - 1))
            pool.last_error = str(e) or type(e).__name__
            log.warning("warm pool %s: %s", pool.target.template, pool.last_error)
        else:
            pool.failures = 0
            pool.last_error = ""

    async def _warm_snapshot(self, target: PoolTarget) -> SnapshotRecord:
        """The newest warm snapshot of the template (on the wanted backend), else a new one."""
        for record in reversed(
            self.catalog.records(template=target.template, purposes=(SnapshotPurpose.TEMPLATE,))
        ):
            if target.backend in (Backend.AUTO, record.backend):
                return record
        return await self.service.build_template(target.template, backend=target.backend)

    async def _restore(self, snapshot: SnapshotRecord) -> AcquiredSandbox:
        spec = SandboxSpec(id=new_sandbox_id(), template=snapshot.template)
        restored = await self.service.restore(snapshot.id, spec)
        return acquired_from_restore(
            restored, f"warm pool hit: restored from snapshot {snapshot.id}"
        )

    async def _discard(self, acquired: AcquiredSandbox) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await acquired.sandbox.kill()
            except Exception:
                log.exception("stopping pooled sandbox %s failed", acquired.sandbox.id)
            await self.service.release(acquired.sandbox.id)

    async def close(self) -> None:
        """Stops every ready sandbox (the server is stopping)."""
        for pool in self._pools.values():
            while pool.ready:
                await self._discard(pool.ready.pop())


def _fits(request: CreateSandboxRequest, pool: Pool) -> bool:
    """A pooled sandbox serves a create only if nothing asked differs from it: it was
    started with the snapshot's resources and no environment of its own."""
    snap = pool.snapshot
    if snap is None or request.from_snapshot is not None or request.env:
        return False
    return (
        request.backend in (Backend.AUTO, snap.backend)
        and defaults.resources(request.resources) == snap.resources
        and request.network == snap.network
        and request.trust == snap.trust
    )
