"""Where a create comes in on a fleet's API server: the judges admit it, an idempotency
key replays an earlier create, the sandbox is recorded and queued in its lane (Acheron;
a full lane is a 429), and the request waits until a node reports it running."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import msgspec

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.enforcement.records import ErrorCategory
from tartarus.errors import (
    ConflictError,
    InternalError,
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from tartarus.fleet.book import CLAIM_RENEW_S, KeyClaim
from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.part import FleetPart
from tartarus.fleet.records import Records, ended
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import FleetState
from tartarus.fleet.wire import Job
from tartarus.node.admission import AdmissionHook, AdmitAll, TemplateDefaults
from tartarus.node.manager import fingerprint, key_in_flight, key_reused_detail, new_sandbox_id
from tartarus.node.store import SandboxRecord
from tartarus.queue import Lane, QueueFullError
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.heat import classify, default_lane, hottest
from tartarus.scheduling.nodes import PlacementRules

_encode = msgspec.json.Encoder().encode
log = logging.getLogger(__name__)


class Intake(FleetPart):
    def __init__(
        self,
        state: FleetState,
        settings: FleetSettings,
        records: Records,
        errors: ErrorStream,
        metrics: FleetMetrics,
    ) -> None:
        super().__init__(state, settings, records, errors, metrics)
        # The server's Judges and its templates' own defaults (set when the server
        # starts; all admitted as asked until then).
        self.admission: AdmissionHook = AdmitAll()
        self.template_defaults: Callable[[CreateSandboxRequest], TemplateDefaults | None] = (
            lambda request: None
        )

    async def create(
        self, request: CreateSandboxRequest, key: str | None, caller: Principal
    ) -> tuple[SandboxRecord, bool]:
        """Admits, records and queues the sandbox, then waits for its node to start it;
        idempotency keys are per tenant, as on one host."""
        sandbox_id = new_sandbox_id()
        if key is None:
            record = await self._admit_and_enqueue(request, caller, sandbox_id, None)
            return await self._wait_started(record.id), False
        key = f"{caller.tenant}/{key}"
        book = self.state.book
        won, earlier = await book.claim_key(key, fingerprint(request), sandbox_id)
        if not won:
            assert earlier is not None
            return await self._replay(key, request, earlier), True
        try:
            if earlier is not None and earlier.sandbox_id is not None:
                # Taken over from a create whose server died before recording its
                # sandbox: the share it held goes back now, not at the next settling.
                await self.state.quota.release(caller.tenant, earlier.sandbox_id)
            record = await self._admit_holding_claim(request, caller, sandbox_id, key)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await book.release_key(key, sandbox_id)
            raise
        return await self._wait_started(record.id), False

    async def _admit_holding_claim(
        self, request: CreateSandboxRequest, caller: Principal, sandbox_id: str, key: str
    ) -> SandboxRecord:
        outcome: SandboxRecord | Exception
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_claim, key, sandbox_id)
            try:
                outcome = await self._admit_and_enqueue(request, caller, sandbox_id, key)
            except Exception as e:
                # Raised outside the task group, which would wrap it in a group.
                outcome = e
            tg.cancel_scope.cancel()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _renew_claim(self, key: str, sandbox_id: str) -> None:
        """Keeps the claim while the create admits; a renewal that fails is logged (the
        claim may then lapse, and the insert say so)."""
        while True:
            await anyio.sleep(CLAIM_RENEW_S)
            try:
                await self.state.book.renew_key(key, sandbox_id)
            except Exception as e:
                log.warning("renewing the claim of idempotency key %r failed: %s", key, e)

    async def _admit_and_enqueue(
        self, request: CreateSandboxRequest, caller: Principal, sandbox_id: str, key: str | None
    ) -> SandboxRecord:
        # The Judges (policy rules, template defaults, audit) decide here; the quota
        # share is held fleet-wide under the sandbox's id until its record ends.
        admitted = await self.admission.admit(
            caller, request, self.template_defaults(request), hold_as=sandbox_id
        )
        admitted.release()  # a local hold, if any: the shared one counts
        try:
            return await self._enqueue(admitted.request, caller, sandbox_id, admitted.egress, key)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.state.quota.release(caller.tenant, sandbox_id)
            raise

    async def _replay(
        self, key: str, request: CreateSandboxRequest, earlier: KeyClaim
    ) -> SandboxRecord:
        if earlier.fingerprint != fingerprint(request):
            raise InvalidRequestError(key_reused_detail(key), slug="idempotency-key-reused")
        record = None
        if earlier.bound and earlier.sandbox_id is not None:
            record = await self.state.book.get(earlier.sandbox_id)
        if record is None:
            raise key_in_flight(key)
        if record.state is SandboxState.CREATED:
            # Recorded (and queued, unless its job is still pending): the retry waits for
            # it as the first request did (that request's server may be gone).
            if record.pending_job and not record.node:
                await self._queue_again(record)
            return await self._wait_started(record.id)
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
        key: str | None,
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
        place_by = time.time() + self.settings.placement_timeout_s
        job = Job(
            sandbox_id=sandbox_id,
            request=request,
            lane=lane,
            heat=heat,
            tenant=tenant,
            owner=caller.subject,
            quarantined=await self._quarantined(request, tenant),
            egress=egress,
            place_by=place_by,
        )
        encoded = _encode(job)
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
                place_by=place_by,
                pending_job=encoded,
            ),
            key=key,
        )
        await self._queue(record.id, encoded, lane)
        return record

    async def _queue(self, sandbox_id: str, encoded: bytes, lane: Lane) -> None:
        """Puts the recorded sandbox's job in its lane, then forgets the pending copy."""
        try:
            await self.state.lanes.put(encoded, lane)
        except QueueFullError as e:
            refused = f"refused: {e}"
            await self.records.update(sandbox_id, lambda r: ended(r, SandboxState.FAILED, refused))
            await self.errors.error(ErrorCategory.QUEUE, str(e), sandbox_id=sandbox_id)
            raise OverloadedError(str(e), slug="queue-full", retry_after=1) from e
        except BaseException as e:
            # Never queued (Redis went away, say): nothing would ever place it.
            failed = f"could not be queued: {e}"
            with anyio.CancelScope(shield=True):
                await self.records.update(
                    sandbox_id, lambda r: ended(r, SandboxState.FAILED, failed) if r.live else None
                )
            raise
        self.metrics.enqueued.labels(lane.value).inc()
        try:
            await self.records.update(
                sandbox_id,
                lambda r: msgspec.structs.replace(r, pending_job=b"") if r.pending_job else None,
            )
        except Exception as e:
            # Queued all the same; a retry of the create that still finds the copy queues
            # a duplicate, which placement drops.
            log.warning("could not mark the job of %s queued: %s", sandbox_id, e)

    async def _queue_again(self, record: SandboxRecord) -> None:
        """A retried create found its sandbox recorded but maybe never queued (the API
        server that recorded it died first): queues its job, with a new deadline."""
        job = msgspec.json.decode(record.pending_job, type=Job)
        job = msgspec.structs.replace(job, place_by=time.time() + self.settings.placement_timeout_s)
        await self.records.update(
            record.id,
            lambda r: (
                msgspec.structs.replace(r, place_by=job.place_by)
                if r.state is SandboxState.CREATED and not r.node
                else None
            ),
        )
        await self._queue(record.id, _encode(job), job.lane)

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
