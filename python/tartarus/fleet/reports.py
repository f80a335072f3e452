"""What node agents tell the fleet: a finished inbox message, changes of their
sandboxes' records, enforcement events (the Erinyes), errors and peaks of use; and the
policy violations operators record (Megaera), which may quarantine a tenant."""

from __future__ import annotations

import msgspec

from tartarus.enforcement.records import EnforcementEvent, ErrorCategory
from tartarus.enforcement.violations import escalate, violation
from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.records import Records, newer, node_owned
from tartarus.fleet.state import FleetState
from tartarus.fleet.wire import NodeReport, WorkDone
from tartarus.node.store import SandboxRecord
from tartarus.runtime.types import SandboxState


class Reports:
    def __init__(
        self, state: FleetState, records: Records, errors: ErrorStream, metrics: FleetMetrics
    ) -> None:
        self.state = state
        self.records = records
        self.errors = errors
        self.metrics = metrics

    async def apply(self, node_id: str, reported: SandboxRecord) -> SandboxRecord | None:
        """Takes a node's view of one of its sandboxes; ignored unless the fleet placed it
        there and still thinks it is live (a node cut off and declared lost is fenced),
        and unless it is newer than the view the fleet has."""
        stored = await self.records.update(
            reported.id,
            lambda r: (
                node_owned(r, reported)
                if r.node == node_id and r.live and newer(r, reported)
                else None
            ),
        )
        if stored is not None and not stored.live:
            await self.state.registry.release(stored.id)
        if stored is not None and stored.node == node_id and stored.state is SandboxState.RUNNING:
            self.metrics.launches.inc()
        return stored

    async def work_done(self, node_id: str, done: WorkDone) -> bool:
        """A node finished one inbox message; returns whether it should keep the sandbox."""
        stored = await self.apply(node_id, done.record)
        inbox = self.state.inbox(node_id)
        if done.record.state is SandboxState.FAILED:
            reason = f"node {node_id} could not start it: {done.record.detail}"
            await inbox.bury(done.message, reason)
            await self.errors.error(
                ErrorCategory.START, reason, sandbox_id=done.record.id, node_id=node_id
            )
        else:
            await inbox.ack(done.message)
        return stored is not None and stored.node == node_id and stored.live

    async def report(self, node_id: str, report: NodeReport) -> None:
        for record in report.records:
            await self.apply(node_id, record)
        for event in report.events:
            await self.enforcement_event(msgspec.structs.replace(event, node_id=node_id))
        for err in report.errors:
            await self.errors.append(msgspec.structs.replace(err, node_id=node_id))
        for peak in report.peaks:
            # Phlegethon learns: the template's and the tenant's history of use.
            for subject in (f"template:{peak.template}", f"tenant:{peak.tenant}"):
                await self.state.registry.record_heat(subject, peak.cpu_share, peak.memory_share)

    async def violation(self, sandbox_id: str, detail: str) -> EnforcementEvent:
        """Megaera: records a policy violation; enough of them quarantine the tenant."""
        record = await self.records.get(sandbox_id)
        tenant = record.tenant
        event = violation(sandbox_id, tenant, detail)
        await self.enforcement_event(event)
        if tenant:
            earlier = await self.state.events.query({"tenant": tenant}, limit=1000)
            escalation = escalate(earlier, tenant)
            if escalation is not None:
                await self.enforcement_event(escalation)
        return event

    async def enforcement_event(self, event: EnforcementEvent) -> None:
        self.metrics.enforcement.labels(event.fury.value, event.action.value).inc()
        await self.state.events.append(event)
        if event.action.value == "quarantine" and event.tenant:
            await self.state.registry.quarantine(f"tenant:{event.tenant}", event.detail)
