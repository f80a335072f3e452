"""Scheduler workers: take a job from the lanes, let Moirai choose a node, reserve its
capacity (Hades) and put the job in the node's inbox. Work no node can take before its
placement deadline fails and is dead-lettered with the reason."""

from __future__ import annotations

import time

import anyio
import msgspec

from tartarus.enforcement.records import ErrorCategory
from tartarus.fleet.part import FleetPart
from tartarus.fleet.records import ended
from tartarus.fleet.wire import Job
from tartarus.node.store import SandboxRecord
from tartarus.queue import Message
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.nodes import Placement, PlacementRules, Reservation
from tartarus.scheduling.scheduler import NoNodeFitsError, schedule

_jobs = msgspec.json.Decoder(Job)


def placement_of(job: Job) -> Placement:
    return Placement(
        sandbox_id=job.sandbox_id,
        resources=job.request.resources.to_runtime(),
        backend=job.request.backend,
        rules=job.request.placement or PlacementRules(),
        tenant=job.tenant,
        template=job.request.template,
        quarantined=job.quarantined,
    )


def reservation_of(job: Job) -> Reservation:
    resources = job.request.resources.to_runtime()
    return Reservation(
        sandbox_id=job.sandbox_id,
        vcpus=resources.vcpus,
        memory_mib=resources.memory_mib,
        groups=list(job.request.placement.groups) if job.request.placement else [],
    )


class Placer(FleetPart):
    async def schedule_once(self, consumer: str) -> None:
        message = await self.state.lanes.get(consumer, timeout_s=5.0)
        if message is None:
            return
        try:
            job = _jobs.decode(message.body)
        except msgspec.DecodeError as e:
            await self.state.lanes.bury(message, f"undecodable job: {e}")
            await self.errors.error(ErrorCategory.QUEUE, f"undecodable job {message.id}: {e}")
            return
        record = await self.state.book.get(job.sandbox_id)
        if record is None or record.state is not SandboxState.CREATED:
            await self.state.lanes.ack(message)  # deleted while it waited
            return
        await self._place(message, job, record)

    async def _place(self, message: Message, job: Job, record: SandboxRecord) -> None:
        placement = placement_of(job)
        registry = self.state.registry
        started = time.perf_counter()
        extended = anyio.current_time()
        while True:
            try:
                if record.node:
                    # Redelivered after a crash between placing and acknowledging: the
                    # node was chosen and reserved already.
                    node_id = record.node
                else:
                    decision = schedule(
                        placement,
                        await registry.nodes(),
                        heat=job.heat,
                        strategy=self.settings.strategy,
                        routing=self.settings.routing,
                    )
                    node_id = decision.node_id
                    why = await registry.reserve(node_id, reservation_of(job))
                    if why is not None:
                        continue  # lost a race for that capacity: look again
                break
            except NoNodeFitsError as e:
                if time.time() >= job.place_by:
                    await self._unschedulable(message, job, str(e))
                    return
                if anyio.current_time() - extended > self.settings.lanes.visibility_timeout_s / 3:
                    await self.state.lanes.extend(message)
                    extended = anyio.current_time()
                await anyio.sleep(0.2)
        self.metrics.decisions.observe(time.perf_counter() - started)
        # Placed once: a second copy of the job (a put resent after its reply was lost)
        # finds it placed and is dropped. The new node counts its reports from 1.
        placed = await self.records.update(
            job.sandbox_id,
            lambda r: (
                msgspec.structs.replace(
                    r,
                    node=node_id,
                    revision=0,
                    detail=f"placed on node {node_id} ({job.heat.value})",
                )
                if r.state is SandboxState.CREATED and not r.node
                else None
            ),
        )
        if placed is None or placed.state is not SandboxState.CREATED or placed.node != node_id:
            await registry.release(job.sandbox_id)
            await self.state.lanes.ack(message)
            return
        await self.state.inbox(node_id).put(message.body, job.lane)
        await self.state.lanes.ack(message)

    async def _unschedulable(self, message: Message, job: Job, reason: str) -> None:
        await self.records.update(
            job.sandbox_id, lambda r: ended(r, SandboxState.FAILED, reason) if r.live else None
        )
        await self.state.lanes.bury(message, reason)
        await self.errors.error(ErrorCategory.SCHEDULING, reason, sandbox_id=job.sandbox_id)
