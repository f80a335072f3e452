"""Nodes that go away and records past their time.

A node that stops heart-beating (or leaves) is reaped: work still in its inbox goes back
to the lanes (up to `max_reschedules` times), its running sandboxes fail with the
reason, and the reason goes to the error stream (Cocytus). A sandbox recorded but
never queued (its API server died in between) fails once no placement could still be
pending for it. Errors, events and ended records past retention are purged.
"""

from __future__ import annotations

import logging
import time

import msgspec

from tartarus.enforcement.records import ErrorCategory
from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.records import Records, ended
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import FleetState
from tartarus.fleet.wire import Job
from tartarus.node.store import ListFilter, SandboxRecord
from tartarus.queue import QueueFullError
from tartarus.runtime.types import SandboxState

log = logging.getLogger(__name__)

_jobs = msgspec.json.Decoder(Job)
_encode = msgspec.json.Encoder().encode


class Reaper:
    def __init__(
        self, state: FleetState, settings: FleetSettings, records: Records, errors: ErrorStream
    ) -> None:
        self.state = state
        self.settings = settings
        self.records = records
        self.errors = errors

    async def reap(self) -> None:
        for node in await self.state.registry.reap():
            await self.node_gone(
                node.id,
                f"node {node.id} stopped sending heartbeats (none for "
                f"{self.settings.heartbeat_ttl_s:g} s)",
            )

    async def node_gone(self, node_id: str, reason: str) -> None:
        """Work still queued for the node goes back to the lanes; its sandboxes fail."""
        log.warning("%s: rescheduling its queued work, failing its sandboxes", reason)
        await self.errors.error(ErrorCategory.NODE_LOST, reason, node_id=node_id)
        for message in await self.state.inbox(node_id).drain():
            try:
                job = _jobs.decode(message.body)
            except msgspec.DecodeError:
                continue
            await self._reschedule(job, reason)
        for record in await self.state.book.on_node(node_id):
            await self.state.registry.release(record.id)
            failed = await self.records.update(
                record.id,
                lambda r: (
                    ended(r, SandboxState.FAILED, f"lost: {reason}")
                    if r.live and r.node == node_id
                    else None
                ),
            )
            if failed is not None and failed.state is SandboxState.FAILED:
                await self.errors.error(
                    ErrorCategory.NODE_LOST,
                    f"sandbox lost with its node: {reason}",
                    sandbox_id=record.id,
                    node_id=node_id,
                )

    async def _reschedule(self, job: Job, reason: str) -> None:
        await self.state.registry.release(job.sandbox_id)
        if job.reschedules >= self.settings.max_reschedules:
            detail = f"gave up after {job.reschedules} reschedules; last: {reason}"
            await self.records.update(
                job.sandbox_id, lambda r: ended(r, SandboxState.FAILED, detail) if r.live else None
            )
            await self.errors.error(ErrorCategory.SCHEDULING, detail, sandbox_id=job.sandbox_id)
            return
        again = msgspec.structs.replace(
            job,
            reschedules=job.reschedules + 1,
            place_by=time.time() + self.settings.placement_timeout_s,
        )
        moved = await self.records.update(
            job.sandbox_id,
            lambda r: (
                msgspec.structs.replace(
                    r,
                    node="",
                    revision=0,
                    place_by=again.place_by,
                    detail=f"rescheduled ({reason}); queued in the {job.lane.value} lane",
                )
                if r.state is SandboxState.CREATED
                else None
            ),
        )
        if moved is None or moved.state is not SandboxState.CREATED:
            return
        try:
            await self.state.lanes.put(_encode(again), job.lane)
        except QueueFullError as e:
            detail = f"{reason}; then {e}"
            await self.records.update(
                job.sandbox_id, lambda r: ended(r, SandboxState.FAILED, detail)
            )
            await self.errors.error(ErrorCategory.QUEUE, str(e), sandbox_id=job.sandbox_id)

    async def fail_stranded(self, grace_s: float = 60.0) -> int:
        """Fails sandboxes still waiting for a node `grace_s` past their job's placement
        deadline (each reschedule sets a new one): their job was lost (its API server
        died between recording and queueing it) or waited in a lane past its deadline,
        which placement would fail it for anyway; the quota share goes back. Returns
        how many this server failed."""
        cutoff = time.time() - grace_s
        failed = 0
        after = 0
        waiting = ListFilter(states=(SandboxState.CREATED,))
        reason = "not placed by its deadline: its job was lost or waited too long"
        while True:
            page, more = await self.state.book.page(waiting, after_seq=after, limit=200)
            for record in page:
                if record.node or not record.place_by or record.place_by >= cutoff:
                    continue
                ours = False

                def fail(r: SandboxRecord) -> SandboxRecord | None:
                    nonlocal ours
                    ours = r.state is SandboxState.CREATED and not r.node
                    return ended(r, SandboxState.FAILED, reason) if ours else None

                await self.records.update(record.id, fail)
                if ours:  # another server's sweep may have failed it first
                    failed += 1
                    await self.errors.error(ErrorCategory.SCHEDULING, reason, sandbox_id=record.id)
            if more is None:
                return failed
            after = more

    async def purge(self) -> None:
        cutoff = time.time() - self.settings.retention_s
        await self.state.errors.purge(cutoff)
        await self.state.events.purge(cutoff)
        await self.state.book.purge(time.time() - 24 * 3600.0)
