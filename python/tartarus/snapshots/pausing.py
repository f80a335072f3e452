"""Pause and resume (Hypnos).

On gvisor and microvm a pause writes the sandbox to a `pause` snapshot (Nyx) and ends
it: its memory, processes, network namespace and template hold are all freed, and the
record waits as `paused`, surviving a server restart (nothing of it is on the host but
the snapshot). A resume restores the snapshot under the same id, so files, processes and
memory are as they were; the snapshot is deleted once the sandbox runs again.

On the jail a pause freezes the sandbox's cgroup instead: processes stop where they
are, memory stays in use, and a server restart loses it like any running jail sandbox.

A paused sandbox's timeout clock stops, and it counts against no quota (a resume is
admitted like a create). Calls that need the sandbox running get 409 until it resumes.
"""

from __future__ import annotations

import contextlib
import logging

import anyio

from tartarus.auth.principal import Principal
from tartarus.errors import ConflictError
from tartarus.node.manager import SandboxManager, request_of
from tartarus.node.store import SandboxRecord
from tartarus.runtime.types import Backend, SandboxSpec, SandboxState
from tartarus.snapshots.catalog import SnapshotPurpose
from tartarus.snapshots.pools import acquired_from_restore, facts_of_live
from tartarus.snapshots.service import SnapshotNotFoundError, SnapshotService, failures_as

log = logging.getLogger(__name__)

# Backends whose pause is a freeze in place rather than a snapshot on disk.
FREEZES = (Backend.JAIL,)


class Pausing:
    def __init__(self, manager: SandboxManager, service: SnapshotService) -> None:
        self.manager = manager
        self.service = service
        # One resume at a time per sandbox: a second caller waits, then finds it running.
        self._resuming: dict[str, anyio.Lock] = {}
        manager.discard_paused.append(self._discard)
        manager.pauser = self.pause

    async def pause(self, sandbox_id: str) -> SandboxRecord:
        """Pauses a running sandbox; pausing a paused one changes nothing."""
        live = self.manager.pausable(sandbox_id)
        if live is None:
            return self.manager.record(sandbox_id)
        async with live.lock:
            if live.closing or live.record.state is not SandboxState.RUNNING:
                return self.manager.record(sandbox_id)
            with failures_as(f"pause {sandbox_id}", "pause-failed", not_supported_as_is=True):
                if live.record.backend in FREEZES:
                    await live.sandbox.freeze()
                    return self.manager.mark_frozen(live)
                snap = await self.service.suspend(live.sandbox, facts_of_live(live))
            return await self.manager.set_aside(live, snap.id)

    async def resume(self, sandbox_id: str, caller: Principal) -> SandboxRecord:
        """Resumes a paused sandbox; resuming a running one changes nothing."""
        frozen = self.manager.frozen(sandbox_id)
        if frozen is not None:
            async with frozen.lock:
                if frozen.record.state is SandboxState.PAUSED:
                    with failures_as(f"resume {sandbox_id}", "resume-failed"):
                        await frozen.sandbox.thaw()
                    self.manager.mark_thawed(frozen)
            return frozen.record
        lock = self._resuming.setdefault(sandbox_id, anyio.Lock())
        try:
            async with lock:
                record = self.manager.record(sandbox_id)
                if record.state is not SandboxState.PAUSED:
                    if record.live:
                        return record
                    raise ConflictError(
                        f"sandbox {sandbox_id} is {record.state.value}, not paused",
                        slug="not-paused",
                    )
                return await self._restore(record, caller)
        finally:
            if not lock.locked():
                self._resuming.pop(sandbox_id, None)

    async def _restore(self, record: SandboxRecord, caller: Principal) -> SandboxRecord:
        request = request_of(record, record.remaining_s or 1.0)
        admitted = await self.manager.admission.admit(caller, request)
        try:
            spec = SandboxSpec(id=record.id, metadata=record.metadata, egress=[*admitted.egress])
            with failures_as(f"resume {record.id}", "resume-failed"):
                restored = await self.service.restore(record.pause_snapshot, spec)
            snapshot_id = record.pause_snapshot
            resumed = self.manager.take_back(
                record, admitted, acquired_from_restore(restored, record.backend_reason)
            )
        except BaseException:
            admitted.release()
            raise
        # The running sandbox holds the snapshot's files; the record can go.
        try:
            await self.service.delete(snapshot_id)
        except Exception:
            log.exception("deleting pause snapshot %s of %s failed", snapshot_id, record.id)
        return resumed

    async def _discard(self, record: SandboxRecord) -> None:
        """A paused sandbox is deleted: its snapshot goes, or, if it asked for a
        checkpoint on stop, stays as that checkpoint (it is the sandbox as it stopped)."""
        if not record.pause_snapshot:
            return
        snapshot = self.service.catalog.get(record.pause_snapshot)
        if snapshot is not None and record.checkpoint_on_stop:
            self.service.catalog.repurpose(
                snapshot, SnapshotPurpose.TERMINATE, "checkpoint on stop (deleted while paused)"
            )
            return
        with contextlib.suppress(SnapshotNotFoundError):
            await self.service.delete(record.pause_snapshot)
