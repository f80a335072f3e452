"""The API server's side of a fleet: every `tartarus serve --state URL` runs one, and any
number of them can share one Redis (they keep nothing that matters in memory).

A create is recorded, queued in its lane (Acheron; a full lane is a 429), taken by a
scheduler worker of any API server, placed by Moirai on a node whose capacity is then
reserved (Hades), and sent to that node's inbox; the node agent pulls it, creates the
sandbox with its embedded manager, and reports the record back. The create request
waits for that report. Requests for one sandbox are forwarded to its node.

A node that stops heart-beating is reaped: work still in its inbox goes back to the
lanes (up to `max_reschedules` times), its running sandboxes are failed with the reason,
and the reason goes to the error stream (Cocytus). Work no node can take before its
placement deadline fails and is dead-lettered with the reason.
"""

from __future__ import annotations

import logging
import secrets
import ssl
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import msgspec

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.enforcement.records import EnforcementEvent, ErrorCategory, ErrorRecord
from tartarus.enforcement.violations import escalate, violation
from tartarus.errors import (
    ConflictError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    SandboxNotRunningError,
    UnavailableError,
)
from tartarus.fleet.book import RedisBook
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.proxy import NodeProxy
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import FleetState
from tartarus.fleet.wire import Job, NodeReport, WorkDone
from tartarus.node.admission import AdmissionHook, AdmitAll, TemplateDefaults
from tartarus.node.manager import fingerprint, key_in_flight, key_reused_detail, new_sandbox_id
from tartarus.node.store import SandboxRecord
from tartarus.queue import Lane, Message, QueueFullError
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.heat import classify, default_lane, hottest
from tartarus.scheduling.nodes import NodeState, Placement, PlacementRules, Reservation
from tartarus.scheduling.scheduler import NoNodeFitsError, schedule

log = logging.getLogger(__name__)

_jobs = msgspec.json.Decoder(Job)
_encode = msgspec.json.Encoder().encode


def node_owned(record: SandboxRecord, reported: SandboxRecord) -> SandboxRecord:
    """The fleet's record updated with what the node reports (the node decides state,
    backend, deadline and detail; the fleet keeps identity, placement and order)."""
    return msgspec.structs.replace(
        record,
        state=reported.state,
        backend=reported.backend,
        backend_reason=reported.backend_reason,
        detail=reported.detail,
        expires_at=reported.expires_at,
        ended_at=reported.ended_at,
    )


def _end(record: SandboxRecord, state: SandboxState, detail: str) -> SandboxRecord:
    return msgspec.structs.replace(record, state=state, detail=detail, ended_at=time.time())


class Coordinator:
    def __init__(
        self,
        state: FleetState,
        settings: FleetSettings,
        *,
        join_token: str,
        node_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.state = state
        self.settings = settings
        self.join_token = join_token
        self.server_id = f"api-{secrets.token_hex(4)}"
        self.proxy = NodeProxy(join_token, node_tls)
        self.metrics = FleetMetrics(self)
        # The server's Judges and its templates' own defaults (set when the server
        # starts; all admitted as asked until then).
        self.admission: AdmissionHook = AdmitAll()
        self.template_defaults: Callable[[CreateSandboxRequest], TemplateDefaults | None] = (
            lambda request: None
        )

    # --- running ------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Scheduler workers, the reaper, retention and metrics, until the block exits."""
        async with anyio.create_task_group() as tg:
            for worker in range(self.settings.schedulers):
                tg.start_soon(self._forever, self.schedule_once, f"{self.server_id}-{worker}")
            tg.start_soon(self._every, self.settings.heartbeat_ttl_s / 2, self.reap)
            tg.start_soon(self._every, 60.0, self.purge)
            tg.start_soon(self._every, 30.0, self.settle_quota)
            tg.start_soon(self._every, 2.0, self.metrics.refresh)
            if isinstance(self.state.book, RedisBook):
                tg.start_soon(self._forever, self._listen)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self.proxy.close()

    async def _listen(self) -> None:
        assert isinstance(self.state.book, RedisBook)
        await self.state.book.listen()

    async def _forever(self, step: Callable[..., object], *args: object) -> None:
        """Runs `step` again and again; a failure is logged, recorded and retried."""
        while True:
            try:
                await step(*args)  # type: ignore[misc]
            except Exception as e:
                log.exception("fleet task %s failed; retrying", getattr(step, "__name__", step))
                await self.error(ErrorCategory.INTERNAL, f"{type(e).__name__}: {e}", trace=True)
                await anyio.sleep(1.0)

    async def _every(self, period_s: float, step: Callable[[], object]) -> None:
        async def once() -> None:
            await step()  # type: ignore[misc]
            await anyio.sleep(period_s)

        await self._forever(once)

    async def error(
        self,
        category: ErrorCategory,
        message: str,
        *,
        sandbox_id: str = "",
        node_id: str = "",
        trace: bool = False,
    ) -> None:
        self.metrics.errors.labels(category.value).inc()
        try:
            await self.state.errors.append(
                ErrorRecord(
                    category=category,
                    message=message,
                    sandbox_id=sandbox_id,
                    node_id=node_id,
                    trace=traceback.format_exc() if trace else "",
                )
            )
        except Exception:
            log.exception("could not record an error in the error stream: %s", message)

    async def _update(
        self, sandbox_id: str, change: Callable[[SandboxRecord], SandboxRecord | None]
    ) -> SandboxRecord | None:
        """Every change of a fleet record goes through here: when the record has ended,
        its tenant's quota share is given back (on every path that ends a sandbox)."""
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

    # --- creating -----------------------------------------------------------------------

    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        """Admits, records and queues the sandbox, then waits for its node to start it;
        idempotency keys are per tenant, as on one host."""
        book = self.state.book
        if key is not None:
            key = f"{caller.tenant}/{key}"
            claimed = await book.claim_key(key, fingerprint(request))
            if claimed is not None:
                return await self._replay(key, request, *claimed), True
        sandbox_id = new_sandbox_id()
        try:
            # The Judges (policy rules, template defaults, audit) decide here; the quota
            # share is held fleet-wide under the sandbox's id until its record ends.
            admitted = await self.admission.admit(
                caller, request, self.template_defaults(request), hold_as=sandbox_id
            )
            admitted.release()  # a local hold, if any: the shared one counts
            try:
                record = await self._enqueue(admitted.request, caller, sandbox_id, admitted.egress)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self.state.quota.release(caller.tenant, sandbox_id)
                raise
        except BaseException:
            if key is not None:
                with anyio.CancelScope(shield=True):
                    await book.release_key(key)
            raise
        if key is not None:
            await book.bind_key(key, record.id)
        return await self._wait_started(record.id), False

    async def _replay(
        self, key: str, request: CreateSandboxRequest, earlier: str, sandbox_id: str | None
    ) -> SandboxRecord:
        if earlier != fingerprint(request):
            raise InvalidRequestError(key_reused_detail(key), slug="idempotency-key-reused")
        record = None if sandbox_id is None else await self.state.book.get(sandbox_id)
        if record is None or record.state is SandboxState.CREATED:
            raise key_in_flight(key)
        return record

    async def _quarantined(self, request: CreateSandboxRequest, tenant: str) -> bool:
        flagged = await self.state.registry.quarantined()
        groups = request.placement.groups if request.placement else []
        subjects = [f"tenant:{tenant}", f"template:{request.template}"]
        subjects += [f"group:{g}" for g in groups]
        return any(s in flagged for s in subjects if not s.endswith(":"))

    async def _enqueue(
        self,
        request: CreateSandboxRequest,
        caller: Principal,
        sandbox_id: str,
        egress: list[str],
    ) -> SandboxRecord:
        tenant = caller.tenant
        registry = self.state.registry
        histories = [
            await registry.heat_history(f"template:{request.template}"),
            await registry.heat_history(f"tenant:{tenant}"),
        ]
        heat = classify(request.resources.to_runtime(), hottest(histories))
        rules = request.placement or PlacementRules()
        lane = Lane(rules.lane) if rules.lane else default_lane(heat)
        record = await self.state.book.insert(
            SandboxRecord(
                id=sandbox_id,
                template=request.template,
                backend=request.backend,
                requested_backend=request.backend,
                state=SandboxState.CREATED,
                created_at=time.time(),
                resources=request.resources.to_runtime(),
                metadata=request.metadata,
                network=request.network,
                trust=request.trust,
                detail=f"queued in the {lane.value} lane ({heat.value})",
                tenant=tenant,
                owner=caller.subject,
                secrets=request.secrets,
            )
        )
        job = Job(
            sandbox_id=record.id,
            request=request,
            lane=lane,
            heat=heat,
            tenant=tenant,
            owner=caller.subject,
            quarantined=await self._quarantined(request, tenant),
            egress=egress,
            place_by=time.time() + self.settings.placement_timeout_s,
        )
        try:
            await self.state.lanes.put(_encode(job), lane)
        except QueueFullError as e:
            refused = f"refused: {e}"
            await self._update(record.id, lambda r: _end(r, SandboxState.FAILED, refused))
            await self.error(ErrorCategory.QUEUE, str(e), sandbox_id=record.id)
            raise OverloadedError(str(e), slug="queue-full", retry_after=1) from e
        self.metrics.enqueued.labels(lane.value).inc()
        return record

    async def _wait_started(self, sandbox_id: str) -> SandboxRecord:
        deadline = anyio.current_time() + self.settings.create_timeout_s
        while True:
            record = await self.state.book.get(sandbox_id)
            if record is None:
                raise InternalError(f"the record of {sandbox_id} disappeared")
            if record.state is SandboxState.RUNNING:
                return record
            if record.state is not SandboxState.CREATED:
                why = f"sandbox {sandbox_id} did not start: {record.detail}"
                if not record.node:
                    raise UnavailableError(why, slug="unschedulable")
                raise ConflictError(why, slug="could-not-start")
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                raise UnavailableError(
                    f"sandbox {sandbox_id} is still queued ({record.detail}); it will start "
                    "when a node takes it: follow it with GET /v1/sandboxes/" + sandbox_id,
                    slug="still-queued",
                    retry_after=5,
                )
            await self.state.book.wait(sandbox_id, remaining)

    # --- scheduling ---------------------------------------------------------------------

    async def schedule_once(self, consumer: str) -> None:
        message = await self.state.lanes.get(consumer, timeout_s=5.0)
        if message is None:
            return
        try:
            job = _jobs.decode(message.body)
        except msgspec.DecodeError as e:
            await self.state.lanes.bury(message, f"undecodable job: {e}")
            await self.error(ErrorCategory.QUEUE, f"undecodable job {message.id}: {e}")
            return
        record = await self.state.book.get(job.sandbox_id)
        if record is None or record.state is not SandboxState.CREATED:
            await self.state.lanes.ack(message)  # deleted while it waited
            return
        await self._place(message, job, record)

    def _placement(self, job: Job) -> Placement:
        return Placement(
            sandbox_id=job.sandbox_id,
            resources=job.request.resources.to_runtime(),
            backend=job.request.backend,
            rules=job.request.placement or PlacementRules(),
            tenant=job.tenant,
            template=job.request.template,
            quarantined=job.quarantined,
        )

    async def _place(self, message: Message, job: Job, record: SandboxRecord) -> None:
        placement = self._placement(job)
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
                    why = await registry.reserve(node_id, self._reservation(job))
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
        placed = await self._update(
            job.sandbox_id,
            lambda r: (
                msgspec.structs.replace(
                    r, node=node_id, detail=f"placed on node {node_id} ({job.heat.value})"
                )
                if r.state is SandboxState.CREATED
                else None
            ),
        )
        if placed is None or placed.state is not SandboxState.CREATED:
            await registry.release(job.sandbox_id)
            await self.state.lanes.ack(message)
            return
        await self.state.inbox(node_id).put(message.body, job.lane)
        await self.state.lanes.ack(message)

    def _reservation(self, job: Job) -> Reservation:
        resources = job.request.resources.to_runtime()
        return Reservation(
            sandbox_id=job.sandbox_id,
            vcpus=resources.vcpus,
            memory_mib=resources.memory_mib,
            groups=list(job.request.placement.groups) if job.request.placement else [],
        )

    async def _unschedulable(self, message: Message, job: Job, reason: str) -> None:
        await self._update(
            job.sandbox_id, lambda r: _end(r, SandboxState.FAILED, reason) if r.live else None
        )
        await self.state.lanes.bury(message, reason)
        await self.error(ErrorCategory.SCHEDULING, reason, sandbox_id=job.sandbox_id)

    # --- what nodes report --------------------------------------------------------------

    async def apply(self, node_id: str, reported: SandboxRecord) -> SandboxRecord | None:
        """Takes a node's view of one of its sandboxes; ignored unless the fleet placed it
        there and still thinks it is live (a node cut off and declared lost is fenced)."""
        stored = await self._update(
            reported.id,
            lambda r: node_owned(r, reported) if r.node == node_id and r.live else None,
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
            await self.error(
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
            self.metrics.errors.labels(err.category.value).inc()
            await self.state.errors.append(msgspec.structs.replace(err, node_id=node_id))
        for peak in report.peaks:
            # Phlegethon learns: the template's and the tenant's history of use.
            for subject in (f"template:{peak.template}", f"tenant:{peak.tenant}"):
                await self.state.registry.record_heat(subject, peak.cpu_share, peak.memory_share)

    async def violation(self, sandbox_id: str, detail: str) -> EnforcementEvent:
        """Megaera: records a policy violation; enough of them quarantine the tenant."""
        record = await self.record(sandbox_id)
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

    # --- nodes that go away -------------------------------------------------------------

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
        await self.error(ErrorCategory.NODE_LOST, reason, node_id=node_id)
        for message in await self.state.inbox(node_id).drain():
            try:
                job = _jobs.decode(message.body)
            except msgspec.DecodeError:
                continue
            await self._reschedule(job, reason)
        for record in await self.state.book.on_node(node_id):
            await self.state.registry.release(record.id)
            failed = await self._update(
                record.id,
                lambda r: (
                    _end(r, SandboxState.FAILED, f"lost: {reason}")
                    if r.live and r.node == node_id
                    else None
                ),
            )
            if failed is not None and failed.state is SandboxState.FAILED:
                await self.error(
                    ErrorCategory.NODE_LOST,
                    f"sandbox lost with its node: {reason}",
                    sandbox_id=record.id,
                    node_id=node_id,
                )

    async def _reschedule(self, job: Job, reason: str) -> None:
        await self.state.registry.release(job.sandbox_id)
        if job.reschedules >= self.settings.max_reschedules:
            detail = f"gave up after {job.reschedules} reschedules; last: {reason}"
            await self._update(
                job.sandbox_id, lambda r: _end(r, SandboxState.FAILED, detail) if r.live else None
            )
            await self.error(ErrorCategory.SCHEDULING, detail, sandbox_id=job.sandbox_id)
            return
        again = msgspec.structs.replace(
            job,
            reschedules=job.reschedules + 1,
            place_by=time.time() + self.settings.placement_timeout_s,
        )
        moved = await self._update(
            job.sandbox_id,
            lambda r: (
                msgspec.structs.replace(
                    r,
                    node="",
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
            await self._update(job.sandbox_id, lambda r: _end(r, SandboxState.FAILED, detail))
            await self.error(ErrorCategory.QUEUE, str(e), sandbox_id=job.sandbox_id)

    async def purge(self) -> None:
        cutoff = time.time() - self.settings.retention_s
        await self.state.errors.purge(cutoff)
        await self.state.events.purge(cutoff)
        await self.state.book.purge(time.time() - 24 * 3600.0)

    # --- one sandbox --------------------------------------------------------------------

    async def sandbox_tenant(self, sandbox_id: str) -> str | None:
        """For the access check: the sandbox's tenant, None if there is no such sandbox."""
        record = await self.state.book.get(sandbox_id)
        return None if record is None else record.tenant

    async def record(self, sandbox_id: str) -> SandboxRecord:
        record = await self.state.book.get(sandbox_id)
        if record is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return record

    async def running_node(self, sandbox_id: str) -> NodeState:
        """The node that runs the sandbox (requests for it are forwarded there)."""
        record = await self.record(sandbox_id)
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

    async def node_of(self, record: SandboxRecord) -> NodeState | None:
        """The node the sandbox was placed on, None if none was or it has left."""
        return await self.state.registry.node(record.node) if record.node else None

    async def deleted(self, record: SandboxRecord, *, node_reached: bool) -> None:
        """Ends the record of a deleted sandbox; releases its reservation here when no node
        will (it never started, or its node was not reachable)."""
        detail = "deleted" if node_reached else "deleted (its node was not reachable)"
        if record.state is SandboxState.CREATED:
            detail = "deleted before it started"
        await self._update(
            record.id, lambda r: _end(r, SandboxState.STOPPED, detail) if r.live else None
        )
        if not node_reached or record.state is SandboxState.CREATED:
            await self.state.registry.release(record.id)
