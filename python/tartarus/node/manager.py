"""The sandbox manager: creates, tracks, times out and stops this host's sandboxes.

Live sandboxes are held in memory (their runtime handles cannot be persisted); their
records are written through to the store on every state change, so after a crash the
next start knows what was running and reaps it (`reconcile`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import msgspec
from anyio.abc import TaskGroup

from tartarus.api.sandbox import Ending, OnTimeout
from tartarus.api.types import MAX_TIMEOUT_S, CreateSandboxRequest, ResourcesBody
from tartarus.auth.principal import SYSTEM, Principal
from tartarus.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    SandboxNotRunningError,
    UnavailableError,
    is_disk_full,
)
from tartarus.node.admission import AdmissionHook, AdmitAll, Admitted
from tartarus.node.provider import HostRuntimes
from tartarus.node.store import (
    LIVE_STATES,
    ListFilter,
    SandboxRecord,
    Store,
    StoreError,
    decode_cursor,
)
from tartarus.runtime.base import BackendUnavailableError, Execution, Runtime, Sandbox
from tartarus.runtime.types import (
    Backend,
    Resources,
    SandboxSpec,
    SandboxState,
    StopOutcome,
    TrustLevel,
)

log = logging.getLogger(__name__)

# How long to wait for a backend's stop/kill before giving up on it.
TEARDOWN_SLACK_S = 15.0
# Ended sandboxes are remembered this long (for `inspect` and `ps -a`).
RETENTION_S = 24 * 3600.0
EXPIRY_TICK_S = 0.25
# The shortest sleep of the expiry loop (no busy loop on a deadline already handled).
EXPIRY_MIN_S = 0.005
# The longest wait between two looks for sandboxes paused too long.
PAUSED_CHECK_S = 60.0
# Sandboxes re-attached at once after a restart (one that stalls delays only its slot).
REATTACH_PARALLEL = 8
# How long the check of a sandbox that looks gone may take (it runs in the expiry loop).
LOST_STATUS_TIMEOUT_S = 5.0


@dataclass(eq=False)
class LiveSandbox:
    record: SandboxRecord
    sandbox: Sandbox
    runtime: Runtime
    # Processes started through the API that a client may still write to or resize.
    executions: dict[int, Execution] = field(default_factory=dict)
    # Per-sandbox services (e.g. the code kernel) closed before the sandbox stops.
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    attachments: dict[str, Any] = field(default_factory=dict)
    # The template's working directory: where commands run unless they say otherwise.
    workdir: str = "/"
    closing: bool = False
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Set once the sandbox has stopped: streams following it end then.
    ended: anyio.Event = field(default_factory=anyio.Event)
    # The end of the last API call that needed it running, and how many are running
    # now (streams and terminals included): auto-pause counts idle time from the end.
    last_active: float = field(default_factory=time.time)
    busy: int = 0

    def idle_deadline(self) -> float | None:
        after = self.record.auto_pause_after_s
        if after is None or self.busy or self.record.state is not SandboxState.RUNNING:
            return None
        return self.last_active + after


@dataclass(eq=False)
class AcquiredSandbox:
    """A running sandbox a `SandboxSource` hands out instead of a fresh one."""

    sandbox: Sandbox
    runtime: Runtime
    template: str
    resources: Resources
    network: bool
    trust: TrustLevel
    # Shown as the record's backend_reason (e.g. "warm pool hit").
    reason: str
    attachments: dict[str, Any] = field(default_factory=dict)
    workdir: str = "/"


class SandboxSource(Protocol):
    """Where a create can get a ready sandbox (Nyx: a warm pool, or a snapshot to
    restore); None means the manager starts one itself."""

    async def acquire(
        self, request: CreateSandboxRequest, caller: Principal, egress: Sequence[str]
    ) -> AcquiredSandbox | None:
        """`egress`: what the sandbox may reach if it has a network; a ready sandbox
        made without those rules must not be handed out for it."""
        ...


SandboxHook = Callable[[LiveSandbox], Awaitable[None]]
# How long bookkeeping that a full disk refuses is tried again before the request fails.
BOOKKEEPING_RETRY_S = 30.0


async def until_written(write: Callable[[], object]) -> None:
    """Runs a bookkeeping write (a store call, or a coroutine function), trying it again
    while SQLite says the disk is full, for up to `BOOKKEEPING_RETRY_S` (the operation it
    records has happened: giving up on the write would lose it); other errors, and a
    disk still full after that, are raised."""
    deadline = time.monotonic() + BOOKKEEPING_RETRY_S
    while True:
        try:
            result = write()
            if inspect.isawaitable(result):
                await result
        except sqlite3.OperationalError as e:
            if not is_disk_full(e) or time.monotonic() > deadline:
                raise
            await anyio.sleep(0.5)
        else:
            return


def new_sandbox_id() -> str:
    return "sb-" + secrets.token_hex(8)


def fingerprint(request: CreateSandboxRequest) -> str:
    return hashlib.sha256(msgspec.json.encode(request, order="sorted")).hexdigest()


# Idempotency keys are stored as `tenant/key`; errors name the key the client sent.
def key_reused_detail(key: str) -> str:
    return (
        f"Idempotency-Key {key.partition('/')[2]!r} was used for a different request; use a new key"
    )


def key_in_flight(key: str) -> ConflictError:
    return ConflictError(
        f"a create with Idempotency-Key {key.partition('/')[2]!r} is still running; retry shortly",
        slug="idempotency-key-in-flight",
        retry_after=1,
    )


class SandboxManager:
    def __init__(
        self,
        store: Store,
        provider: HostRuntimes,
        *,
        grace_s: float = 10.0,
        admission: AdmissionHook | None = None,
        timeout_grace_s: float | None = None,
        reattach: bool = True,
        leave_on_shutdown: bool = False,
        paused_retention_s: float = 0.0,
    ) -> None:
        self.store = store
        self.provider = provider
        self.grace_s = grace_s
        self.admission = admission or AdmitAll()
        # Grace a sandbox gets when its deadline passes (node agents use a short one:
        # Alecto kills a sandbox within a second of its timeout).
        self.timeout_grace_s = grace_s if timeout_grace_s is None else timeout_grace_s
        # Whether `reconcile` takes back sandboxes that outlived the last server (else
        # it reaps them all).
        self.reattach = reattach
        # Whether `shutdown` leaves the sandboxes that can outlive it running, for the
        # next server to take back (an upgrade), instead of stopping them.
        self.leave_on_shutdown = leave_on_shutdown
        # How long a paused sandbox waits for a resume before it is deleted (0: ever).
        self.paused_retention_s = paused_retention_s
        # Extensions (Nyx, lifecycle): a source of ready sandboxes for creates, and hooks
        # run before a sandbox is torn down (it still runs) and after.
        self.source: SandboxSource | None = None
        self.before_teardown: list[SandboxHook] = []
        self.after_teardown: list[SandboxHook] = []
        # Pauses a sandbox by id (Hypnos sets it): what `on_timeout: pause` and
        # `auto_pause_after_s` call.
        self.pauser: Callable[[str], Awaitable[object]] | None = None
        # Run when a sandbox paused to a snapshot is deleted (the snapshot goes).
        self.discard_paused: list[Callable[[SandboxRecord], Awaitable[None]]] = []
        self._live: dict[str, LiveSandbox] = {}
        self._accepting = True
        # Idempotency keys whose create runs in this process now.
        self._creating: set[str] = set()
        self._tasks: TaskGroup | None = None
        # Halted sandboxes whose teardown runs in the background, and how many of those
        # teardowns had to force their way (metrics report both).
        self._tearing_down: dict[str, LiveSandbox] = {}
        self._torn_down = anyio.Event()
        self.teardown_failures = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SandboxManager]:
        """Reconciles, then runs the expiry loop and background work until the block
        exits; on exit every live sandbox is stopped."""
        await self.reconcile()
        async with anyio.create_task_group() as tg:
            self._tasks = tg
            tg.start_soon(self.expire_forever)
            if self.paused_retention_s > 0:
                tg.start_soon(self.expire_paused_forever)
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()
                self._tasks = None

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Runs `fn(*args)` in the background, for as long as the manager runs."""
        if self._tasks is None:
            raise RuntimeError("the sandbox manager is not running")
        self._tasks.start_soon(fn, *args)

    # --- lifecycle of the manager ---------------------------------------------------------

    async def reconcile(self) -> list[str]:
        """Runs once at start: records that say "running" belong to a server that died.
        Sandboxes of theirs that outlived it and whose backend can re-attach (gVisor,
        the jail) rejoin the live set; the rest are reaped and their records closed. Returns the
        ids closed."""
        # A sandbox paused to a snapshot has nothing on this host to lose: it waits.
        orphans = [r for r in self.store.live() if not r.pause_snapshot]
        self.store.release_unbound_keys()
        readopted: dict[Backend, set[str]] = {}
        limiter = anyio.CapacityLimiter(REATTACH_PARALLEL)

        async def reattach(record: SandboxRecord) -> None:
            async with limiter:
                if await self._reattach(record):
                    readopted.setdefault(record.backend, set()).add(record.id)

        async with anyio.create_task_group() as tg:
            for record in orphans:
                # Running, or paused in place (a frozen jail: it still runs, frozen).
                if self.reattach and record.state in (SandboxState.RUNNING, SandboxState.PAUSED):
                    tg.start_soon(reattach, record)
        reaped = await self.provider.reap_all(keep=readopted)
        orphans = [r for r in orphans if r.id not in readopted.get(r.backend, ())]
        now = time.time()
        for record in orphans:
            await self.provider.release(record.id)
            record.state = SandboxState.FAILED
            record.ending = Ending.FAILED
            record.ended_at = now
            record.detail = (
                "the server stopped while this sandbox was running; it was reaped on restart"
                if record.id in reaped or record.state is not SandboxState.CREATED
                else "the server stopped while this sandbox was being created"
            )
            self.store.save(record)
        self.store.purge_ended(now - RETENTION_S)
        return [r.id for r in orphans]

    async def _reattach(self, record: SandboxRecord) -> bool:
        """Takes back a sandbox a server that died left running: its quota share held
        again (no judge sits again), found by its backend, and live again with the
        deadline it had. False, and nothing held, if it cannot be."""
        if record.state is SandboxState.PAUSED:
            remaining = record.remaining_s or 1.0
        else:
            remaining = 1.0 if record.expires_at is None else record.expires_at - time.time()
        request = request_of(record, remaining)
        try:
            admitted = self.admission.readmit(record, owner_of_record(record), request)
        except Exception as e:
            # Its policy cannot be read now: it runs on without a quota hold or wrapper
            # rather than being killed for it.
            log.warning("sandbox %s is re-attached without its policy: %s", record.id, e)
            admitted = AdmitAll().readmit(record, owner_of_record(record), request)
        spec = SandboxSpec(
            id=record.id,
            template=record.template,
            backend=record.backend,
            network=record.network,
            egress=[*admitted.egress],
            trust=record.trust,
            metadata=record.metadata,
            resources=record.resources,
        )
        try:
            found = await self.provider.reattach(spec)
        except Exception:
            log.exception("re-attaching to sandbox %s failed", record.id)
            found = None
        if found is None:
            admitted.release()
            return False
        runtime, sandbox = found
        self._live[record.id] = LiveSandbox(
            record=record,
            sandbox=admitted.bind(record, sandbox),
            runtime=runtime,
            workdir=record.workdir,
        )
        log.info("re-attached to sandbox %s after a restart", record.id)
        return True

    async def expire_forever(self) -> None:
        """Stops (or pauses, as each asked) sandboxes whose deadline passed, and pauses
        those idle past their `auto_pause_after_s`; runs until cancelled. It wakes at
        the next deadline (at least every tick, since deadlines move), and handles every
        sandbox due at once in parallel, so none waits for another's teardown."""
        while True:
            now = time.time()
            deadlines = [d for live in self._live.values() for d in self._deadlines(live)]
            next_due = min([EXPIRY_TICK_S, *(d - now for d in deadlines)])
            await anyio.sleep(max(EXPIRY_MIN_S, next_due))
            now = time.time()
            timed_out, idle, lost = [], [], []
            for live in self._live.values():
                if live.closing:
                    continue
                if live.record.expires_at is not None and live.record.expires_at <= now:
                    timed_out.append(live)
                elif (idle_at := live.idle_deadline()) is not None and idle_at <= now:
                    idle.append(live)
                elif live.sandbox.lost and not live.lock.locked():
                    lost.append(live)
            async with anyio.create_task_group() as tg:
                for live in timed_out:
                    tg.start_soon(self._time_out, live)
                for live in idle:
                    tg.start_soon(self._pause_idle, live)
                for live in lost:
                    tg.start_soon(self._lose, live)

    async def expire_paused_forever(self) -> None:
        """Deletes the sandboxes paused for longer than `paused_retention_s`, with their
        snapshots; runs until cancelled, looking a few times per retention period (at
        most every minute)."""
        retention = self.paused_retention_s
        while True:
            await anyio.sleep(min(PAUSED_CHECK_S, max(EXPIRY_TICK_S, retention / 4)))
            await self.expire_paused(time.time() - retention)

    async def expire_paused(self, paused_before: float) -> list[str]:
        """Deletes the sandboxes paused before `paused_before`; returns their ids."""
        ended = []
        for record in self.store.live():
            paused_at = record.paused_at
            if record.state is not SandboxState.PAUSED or paused_at is None:
                continue
            if paused_at >= paused_before:
                continue
            detail = f"paused for longer than {self.paused_retention_s:g} s; deleted"
            live = self._live.get(record.id)
            try:
                if live is not None:  # frozen in place (a jail)
                    await self._end(live, SandboxState.STOPPED, detail, 0.0)
                else:
                    await self._end_paused(record, detail)
            except Exception:
                log.exception("deleting long-paused sandbox %s failed", record.id)
                continue
            ended.append(record.id)
        return ended

    @staticmethod
    def _deadlines(live: LiveSandbox) -> list[float]:
        if live.closing:
            return []
        found = [live.record.expires_at, live.idle_deadline()]
        return [d for d in found if d is not None]

    async def _time_out(self, live: LiveSandbox) -> None:
        if live.record.on_timeout is OnTimeout.PAUSE and self.pauser is not None:
            try:
                await self.pauser(live.record.id)
            except Exception as e:
                log.warning("pausing %s at its timeout failed (%s); stopping it", live.record.id, e)
            else:
                return
        await self._end(
            live, SandboxState.STOPPED, "timed out", self.timeout_grace_s, ending=Ending.TIMED_OUT
        )

    async def _lose(self, live: LiveSandbox) -> None:
        """Its agent went away by itself: if its backend confirms it stopped, the record
        ends as failed, saying how (the OOM killer, or it exited)."""
        try:
            with anyio.fail_after(LOST_STATUS_TIMEOUT_S):
                async with live.lock:
                    if live.closing or not live.sandbox.lost:
                        return
                    status = await live.sandbox.status()
        except Exception as e:
            log.warning("the status of sandbox %s is unknown: %s", live.record.id, e)
            return
        if status.state in (SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.CREATED):
            return
        ending = Ending.OOM if status.oom else Ending.EXITED
        detail = status.detail or "the sandbox stopped by itself"
        await self._end(live, SandboxState.FAILED, detail, 0.0, ending=ending)

    async def _pause_idle(self, live: LiveSandbox) -> None:
        if self.pauser is None:
            return
        try:
            await self.pauser(live.record.id)
        except Exception as e:
            # It runs on; the next try is a whole idle period away.
            live.last_active = time.time()
            log.warning("pausing idle sandbox %s failed: %s", live.record.id, e)

    async def shutdown(self) -> None:
        """Refuses new sandboxes, then stops every live one with its grace period."""
        self._accepting = False
        async with anyio.create_task_group() as tg:
            for live in list(self._live.values()):
                tg.start_soon(self._leave_or_end, live)
        await self.teardowns_done()

    async def _leave_or_end(self, live: LiveSandbox) -> None:
        if self.leave_on_shutdown and await self._leave(live):
            return
        await self._end(live, SandboxState.STOPPED, "the server shut down", self.grace_s)

    async def _leave(self, live: LiveSandbox) -> bool:
        """Lets go of a sandbox that runs on without this server (its record stays
        as it is, for the next server to re-attach to); False if it cannot."""
        async with live.lock:
            if live.closing or self._live.get(live.record.id) is not live:
                return True
            try:
                if not await live.sandbox.detach():
                    return False
            except Exception:
                log.exception("leaving sandbox %s running failed; stopping it", live.record.id)
                return False
            live.closing = True
            live.ended.set()
            await self._close_services(live)
            self._live.pop(live.record.id, None)
        log.info("left sandbox %s running for the next server", live.record.id)
        return True

    # --- queries ---------------------------------------------------------------------------

    def live_count(self) -> int:
        return len(self._live)

    def record(self, sandbox_id: str) -> SandboxRecord:
        live = self._live.get(sandbox_id)
        if live is not None:
            return live.record
        record = self.store.get(sandbox_id)
        if record is None:
            raise NotFoundError(f"sandbox {sandbox_id} not found")
        return record

    def is_paused(self, sandbox_id: str) -> bool:
        live = self._live.get(sandbox_id)
        if live is not None and not live.closing:
            return live.record.state is SandboxState.PAUSED
        record = self.store.get(sandbox_id)
        return record is not None and record.state is SandboxState.PAUSED

    def live(self, sandbox_id: str) -> LiveSandbox:
        """The running sandbox, or 404 (unknown) / 409 (ended or stopping)."""
        live = self._live.get(sandbox_id)
        if live is not None and not live.closing:
            if live.record.state is SandboxState.PAUSED:
                raise SandboxNotRunningError(paused_detail(sandbox_id))
            if live.sandbox.lost:
                # Its host process died (a killed jail supervisor or runsc): what is
                # left inside may still answer, unsupervised, until the watcher ends it.
                raise SandboxNotRunningError(
                    f"sandbox {sandbox_id} stopped by itself (its host process is gone); "
                    "its record ends as failed"
                )
            return live
        record = self.record(sandbox_id)
        if record.state is SandboxState.PAUSED:
            raise SandboxNotRunningError(paused_detail(sandbox_id))
        raise SandboxNotRunningError(
            f"sandbox {sandbox_id} is {'stopping' if live else record.state.value}"
            + (f" ({record.detail})" if record.detail else ""),
        )

    def list(
        self, flt: ListFilter, *, cursor: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        page, next_seq = self.store.list(flt, after_seq=cursor, limit=limit)
        # Live records in memory are the fresher copy (same content today, kept for safety).
        return [self._live[r.id].record if r.id in self._live else r for r in page], next_seq

    # --- changes ---------------------------------------------------------------------------

    async def create(
        self,
        request: CreateSandboxRequest,
        idempotency_key: str | None = None,
        *,
        caller: Principal = SYSTEM,
        sandbox_id: str | None = None,
        egress: Sequence[str] | None = None,
    ) -> tuple[SandboxRecord, bool]:
        """Creates and starts a sandbox for `caller` (admission decides first); returns its
        record and whether it was a replay of an earlier create with the same idempotency
        key (keys are per tenant). `sandbox_id` is given when the fleet's scheduler named
        the sandbox before sending it to this node; `egress` then carries what the
        fleet's judges allowed it to reach (this node's own admission decides otherwise)."""
        if not self._accepting:
            raise UnavailableError("the server is shutting down", slug="shutting-down")
        sandbox_id = sandbox_id or new_sandbox_id()
        if idempotency_key is None:
            return await self._create(request, caller, sandbox_id, egress), False
        key = f"{caller.tenant}/{idempotency_key}"
        claimed = self.store.claim_key(key, fingerprint(request))
        if claimed is not None and not self._orphaned(key, request, *claimed):
            return self._replay(key, request, *claimed), True
        # Until the key is bound: a retry meanwhile is told to wait, not let in.
        self._creating.add(key)
        try:
            try:
                record = await self._create(request, caller, sandbox_id, egress)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # the create's own error matters more
                    self.store.release_key(key)
                raise
            await self._bind_key(key, record.id)
        finally:
            self._creating.discard(key)
        return record, False

    def _orphaned(
        self, key: str, request: CreateSandboxRequest, earlier: str, sandbox_id: str | None
    ) -> bool:
        """A claim no create runs for: the one that made it failed and could not give it
        back (its write was refused: a full disk), so this create takes it over."""
        return sandbox_id is None and earlier == fingerprint(request) and key not in self._creating

    async def _bind_key(self, key: str, sandbox_id: str) -> None:
        """Binds the key to the new sandbox (through a full disk, see `until_written`);
        if it still cannot, the sandbox is stopped and the refusal raised, so no sandbox
        runs that a retry of the same key cannot find."""
        try:
            await until_written(lambda: self.store.bind_key(key, sandbox_id))
        except sqlite3.OperationalError:
            with contextlib.suppress(Exception):
                await self.delete(sandbox_id)
            raise

    def _replay(
        self, key: str, request: CreateSandboxRequest, earlier: str, sandbox_id: str | None
    ) -> SandboxRecord:
        if earlier != fingerprint(request):
            raise ConflictError(key_reused_detail(key), slug="idempotency-key-reused")
        if sandbox_id is None:
            raise key_in_flight(key)
        return self.record(sandbox_id)

    async def _create(
        self,
        request: CreateSandboxRequest,
        caller: Principal,
        sandbox_id: str,
        egress: Sequence[str] | None,
    ) -> SandboxRecord:
        # The template's own defaults count in admission, so quotas judge what it gets.
        admitted = await self.admission.admit(caller, request, self.provider.defaults_for(request))
        try:
            return await self._place(
                admitted, caller, sandbox_id, admitted.egress if egress is None else egress
            )
        except BaseException:
            admitted.release()
            raise

    async def _place(
        self, admitted: Admitted, caller: Principal, sandbox_id: str, egress: Sequence[str]
    ) -> SandboxRecord:
        """Picks the backend, pins the template's files and checks its limits."""
        request = admitted.request
        if self.source is not None:
            acquired = await self.source.acquire(request, caller, egress)
            if acquired is not None:
                return await self._adopt(admitted, acquired, caller)
        spec = SandboxSpec(
            id=sandbox_id,
            template=request.template,
            backend=request.backend,
            env=request.env,
            network=request.network,
            egress=[*egress],
            trust=request.trust,
            metadata=request.metadata,
        )
        try:
            runtime, reason = await self.provider.select(spec)
        except BackendUnavailableError as e:
            if request.backend is Backend.AUTO:
                raise
            # The client asked for a backend this host lacks: a conflict with this host,
            # which another backend (or host) resolves; not a server failure.
            raise ConflictError(str(e), slug="backend-unavailable") from e
        spec, manifest = await self.provider.prepare(spec, runtime.backend)
        try:
            resources = request.resources.to_runtime()
            check_limits(resources, manifest.max_resources, spec.template)
            spec = msgspec.structs.replace(spec, resources=resources)
            return await self._start(
                spec, runtime, reason, admitted, caller, workdir=manifest.workdir
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.provider.release(spec.id)
            raise

    async def _start(
        self,
        spec: SandboxSpec,
        runtime: Runtime,
        reason: str,
        admitted: Admitted,
        caller: Principal,
        *,
        workdir: str,
    ) -> SandboxRecord:
        request = admitted.request
        record = self.store.insert(
            SandboxRecord(
                id=spec.id,
                template=spec.template,
                backend=runtime.backend,
                state=SandboxState.CREATED,
                created_at=time.time(),
                resources=spec.resources,
                metadata=spec.metadata,
                network=spec.network,
                trust=spec.trust,
                backend_reason=reason,
                workdir=workdir,
                **asked_for(request, caller),
            )
        )
        sandbox: Sandbox | None = None

        def save() -> None:
            self.store.save(record)

        try:
            sandbox = await runtime.create(spec)
            await sandbox.start()
            record.state = SandboxState.RUNNING
            record.expires_at = time.time() + request.resolved_timeout_s()
            # Not running unless its record says so: one that cannot say it is stopped.
            await until_written(save)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                if sandbox is not None:
                    await self._teardown(sandbox, grace_s=0)
                record.state = SandboxState.FAILED
                record.ending = Ending.FAILED
                record.ended_at = time.time()
                record.expires_at = None
                record.detail = f"could not start: {e}" if str(e) else "could not start"
                with contextlib.suppress(sqlite3.Error):  # the start's own error matters more
                    await until_written(save)
            raise
        sandbox = admitted.bind(record, sandbox)
        self._live[record.id] = LiveSandbox(
            record=record, sandbox=sandbox, runtime=runtime, workdir=workdir
        )
        return record

    async def _adopt(
        self, admitted: Admitted, acquired: AcquiredSandbox, caller: Principal
    ) -> SandboxRecord:
        """Records a sandbox a source handed out (it already runs)."""
        request = admitted.request
        now = time.time()
        try:
            record = self.store.insert(
                SandboxRecord(
                    id=acquired.sandbox.id,
                    template=acquired.template,
                    backend=acquired.runtime.backend,
                    state=SandboxState.RUNNING,
                    created_at=now,
                    expires_at=now + request.resolved_timeout_s(),
                    resources=acquired.resources,
                    metadata=request.metadata,
                    network=acquired.network,
                    trust=acquired.trust,
                    backend_reason=acquired.reason,
                    workdir=acquired.workdir,
                    **asked_for(request, caller),
                )
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._teardown(acquired.sandbox, grace_s=0)
                await self.provider.release(acquired.sandbox.id)
            raise
        self._enlist(record, admitted, acquired)
        return record

    def _enlist(self, record: SandboxRecord, admitted: Admitted, acquired: AcquiredSandbox) -> None:
        self._live[record.id] = LiveSandbox(
            record=record,
            sandbox=admitted.bind(record, acquired.sandbox),
            runtime=acquired.runtime,
            attachments=dict(acquired.attachments),
            workdir=acquired.workdir,
        )

    def set_timeout(self, sandbox_id: str, timeout_s: float) -> SandboxRecord:
        record = self.record(sandbox_id)
        if record.state is SandboxState.PAUSED:
            # The clock is stopped: this is what it will have when it resumes.
            record.remaining_s = timeout_s
            self.store.save(record)
            return record
        live = self.live(sandbox_id)
        live.record.expires_at = time.time() + timeout_s
        live.record.timeout_s = timeout_s
        self.store.save(live.record)
        return live.record

    async def delete(self, sandbox_id: str, *, grace_s: float | None = None) -> None:
        """Stops a sandbox (after `grace_s` of SIGTERM; None: its own `stop_grace_s`,
        0 unless its create or template said); deleting an ended one is a no-op."""
        live = self._live.get(sandbox_id)
        if live is None:
            record = self.record(sandbox_id)  # 404 if it never existed
            if record.state is SandboxState.PAUSED:
                await self._end_paused(record, "deleted")
            return
        grace = live.record.stop_grace_s if grace_s is None else grace_s
        await self._end(live, SandboxState.STOPPED, "deleted", grace_s=grace)

    async def end(
        self, sandbox_id: str, state: SandboxState, detail: str, *, grace_s: float = 0.0
    ) -> bool:
        """Ends a live sandbox with `state` and `detail` (enforcement: a kill says why);
        False if it was not live."""
        live = self._live.get(sandbox_id)
        if live is None or live.closing:
            return False
        await self._end(live, state, detail, grace_s=grace_s)
        return True

    def live_sandboxes(self) -> tuple[LiveSandbox, ...]:
        return tuple(live for live in self._live.values() if not live.closing)

    async def _end(
        self,
        live: LiveSandbox,
        state: SandboxState,
        detail: str,
        grace_s: float,
        *,
        ending: Ending | None = None,
    ) -> None:
        """Tears a live sandbox down (SIGTERM, `grace_s`, SIGKILL) and closes its record
        with `state` and `detail`; `ending` says how it ended, else its stop tells.

        Without a grace period the caller (a DELETE) waits only until no code of the
        sandbox can run (`Sandbox.halt`) and its record is closed; the rest of the
        teardown (mounts, cgroup, network, files, its hold on the template) runs in the
        background, counted by `teardowns_in_flight` until it is done."""
        with anyio.CancelScope(shield=True):
            async with live.lock:
                # Ended, or set aside (paused to a snapshot) while this waited.
                if (
                    live.record.state not in LIVE_STATES
                    or self._live.get(live.record.id) is not live
                ):
                    return
                live.closing = True
                if live.record.state is SandboxState.PAUSED:
                    # Frozen in place: a frozen process cannot take its SIGTERM.
                    try:
                        await live.sandbox.thaw()
                    except Exception:
                        log.exception("thawing sandbox %s failed", live.record.id)
                live.record.detail = detail
                # Before the followers go: a checkpoint may still read the sandbox.
                await self._run_hooks(self.before_teardown, live, "before teardown")
                # Followers (logs, attach, websockets) end now, not when their backend
                # stream notices the teardown.
                live.ended.set()
                await self._close_services(live)
                deferred = grace_s <= 0 and self._tasks is not None and await self._halt(live)
                outcome = None if deferred else await self._teardown(live.sandbox, grace_s=grace_s)
                # The sandbox ended when its code stopped; the hooks and unpinning its
                # template (a write to the blob store shared with every build) may wait.
                ended_at = time.time()
                if not deferred:
                    await self._after_teardown(live)
                live.record.state = state
                live.record.ending = ending or ending_of(grace_s, outcome)
                if outcome is not None and outcome.forced:
                    detail += "; the stop failed and the sandbox was killed"
                elif outcome is not None and outcome.killed:
                    detail += (
                        f"; {outcome.killed} process(es) still running after the"
                        f" {grace_s:g} s grace period were killed"
                    )
                live.record.detail = detail
                live.record.ended_at = ended_at
                record = live.record
                if deferred:
                    self._tearing_down[record.id] = live
                    self.spawn(self._finish_teardown, live)
                try:
                    # A record that cannot be closed would say "running" until the next
                    # restart's reconcile.
                    await until_written(lambda: self.store.save(record))
                except sqlite3.Error:
                    log.exception("cannot close the record of %s", live.record.id)
                finally:
                    # Ended whatever its record says: its quota and its place go.
                    self._live.pop(live.record.id, None)
                    live.ended.set()
                    self.admission.ended(live.record)

    async def _halt(self, live: LiveSandbox) -> bool:
        """Kills the sandbox's processes at once; False if that failed (the caller
        then tears it down in full, as before)."""
        try:
            with anyio.fail_after(TEARDOWN_SLACK_S):
                await live.sandbox.halt()
        except Exception:
            log.exception("halting sandbox %s failed; tearing it down", live.record.id)
            return False
        return True

    async def _finish_teardown(self, live: LiveSandbox) -> None:
        """The rest of a halted sandbox's teardown, off its DELETE's path."""
        with anyio.CancelScope(shield=True):
            try:
                outcome = await self._teardown(live.sandbox, grace_s=0)
                if outcome is not None and outcome.forced:
                    self.teardown_failures += 1
                await self._after_teardown(live)
            finally:
                self._tearing_down.pop(live.record.id, None)
                if not self._tearing_down:
                    self._torn_down.set()

    async def _after_teardown(self, live: LiveSandbox) -> None:
        await self._run_hooks(self.after_teardown, live, "after teardown")
        try:
            await until_written(lambda: self.provider.release(live.record.id))
        except Exception:
            log.exception("releasing the template of %s failed", live.record.id)

    @property
    def teardowns_in_flight(self) -> int:
        """Sandboxes halted whose mounts, cgroups, links and files are still going."""
        return len(self._tearing_down)

    async def teardowns_done(self) -> None:
        """Returns once no teardown runs in the background."""
        while self._tearing_down:
            if self._torn_down.is_set():
                self._torn_down = anyio.Event()
            await self._torn_down.wait()

    # --- pause and resume (Hypnos: `tartarus.snapshots.pausing` drives these) -----------

    def pausable(self, sandbox_id: str) -> LiveSandbox | None:
        """The running sandbox to pause, or None if it is paused already; 404/409 for
        one that never existed or ended."""
        return None if self.is_paused(sandbox_id) else self.live(sandbox_id)

    def frozen(self, sandbox_id: str) -> LiveSandbox | None:
        """A paused sandbox still held in place (frozen), if this is one."""
        live = self._live.get(sandbox_id)
        if live is None or live.closing or live.record.state is not SandboxState.PAUSED:
            return None
        return live

    def _stop_clock(self, record: SandboxRecord) -> None:
        now = time.time()
        record.state = SandboxState.PAUSED
        record.paused_at = now
        left = (record.expires_at or now) - now
        # Paused by its own timeout: a resume gives it its whole timeout again.
        record.remaining_s = left if left > 0 or record.timeout_s is None else record.timeout_s
        record.expires_at = None

    def _start_clock(self, record: SandboxRecord) -> None:
        record.state = SandboxState.RUNNING
        record.expires_at = time.time() + (record.remaining_s or 0.0)
        record.paused_at = None
        record.remaining_s = None
        record.pause_snapshot = ""

    def mark_frozen(self, live: LiveSandbox) -> SandboxRecord:
        self._stop_clock(live.record)
        self.store.save(live.record)
        return live.record

    def mark_thawed(self, live: LiveSandbox) -> SandboxRecord:
        self._start_clock(live.record)
        self.store.save(live.record)
        return live.record

    async def set_aside(self, live: LiveSandbox, snapshot_id: str) -> SandboxRecord:
        """The sandbox was suspended into `snapshot_id` (it no longer runs): it leaves
        the live set as paused, its followers end, and its template and quota hold go
        (a resume takes them again)."""
        self._stop_clock(live.record)
        live.record.pause_snapshot = snapshot_id
        live.closing = True
        live.ended.set()
        await self._close_services(live)
        await self._run_hooks(self.after_teardown, live, "after pause")
        try:
            await self.provider.release(live.record.id)
        except Exception:
            log.exception("releasing the template of %s failed", live.record.id)
        self.store.save(live.record)
        self._live.pop(live.record.id, None)
        self.admission.ended(live.record)
        return live.record

    def take_back(
        self,
        record: SandboxRecord,
        admitted: Admitted,
        acquired: AcquiredSandbox,
    ) -> SandboxRecord:
        """A paused sandbox runs again (restored under its own id): it rejoins the live
        set with the timeout it had left."""
        self._start_clock(record)
        record.backend_reason = acquired.reason
        record.workdir = acquired.workdir
        self.store.save(record)
        self._enlist(record, admitted, acquired)
        return record

    async def _end_paused(self, record: SandboxRecord, detail: str) -> None:
        for discard in self.discard_paused:
            try:
                await discard(record)
            except Exception:
                log.exception("discarding the pause snapshot of %s failed", record.id)
        record.state = SandboxState.STOPPED
        record.ending = Ending.KILLED
        record.detail = detail
        record.ended_at = time.time()
        record.paused_at = None
        self.store.save(record)

    @staticmethod
    async def _close_services(live: LiveSandbox) -> None:
        for close in live.closers:
            try:
                await close()
            except Exception:
                log.exception("closing a service of sandbox %s failed", live.record.id)

    @staticmethod
    async def _run_hooks(hooks: Sequence[SandboxHook], live: LiveSandbox, when: str) -> None:
        for hook in hooks:
            try:
                await hook(live)
            except Exception:
                log.exception("a hook %s of sandbox %s failed", when, live.record.id)

    async def _teardown(self, sandbox: Sandbox, *, grace_s: float) -> StopOutcome | None:
        """Stops (or at once kills) `sandbox`; returns how a stop ended its processes."""
        try:
            with anyio.fail_after(grace_s + TEARDOWN_SLACK_S):
                if grace_s > 0:
                    return await sandbox.stop(grace_s)
                await sandbox.kill()
                return None
        except Exception:
            log.exception("stopping sandbox %s failed; killing it", sandbox.id)
        try:
            with anyio.fail_after(TEARDOWN_SLACK_S):
                await sandbox.kill()
        except Exception:
            log.exception("killing sandbox %s failed; it may have leaked", sandbox.id)
        return StopOutcome(forced=True)


def asked_for(request: CreateSandboxRequest, caller: Principal) -> dict[str, Any]:
    """A new record's fields that come from the request and its caller, however the
    sandbox was made (started, or handed out by a source)."""
    return {
        "requested_backend": request.backend,
        "tenant": caller.tenant,
        "owner": caller.subject,
        "secrets": request.secrets,
        "checkpoint_on_stop": request.checkpoint_on_stop,
        "on_timeout": request.on_timeout or OnTimeout.KILL,
        "auto_pause_after_s": request.auto_pause_after_s,
        "stop_grace_s": request.stop_grace_s or 0.0,
        "timeout_s": request.resolved_timeout_s(),
    }


def ending_of(grace_s: float, outcome: StopOutcome | None) -> Ending:
    """How a sandbox stopped when asked ended: at once, within its grace period, or
    with processes killed after it."""
    if grace_s <= 0:
        return Ending.KILLED
    if outcome is not None and (outcome.killed or outcome.forced):
        return Ending.KILLED_AFTER_GRACE
    return Ending.STOPPED


def request_of(record: SandboxRecord, timeout_s: float) -> CreateSandboxRequest:
    """The create request a record stands for, with `timeout_s` left: what a resume or
    a re-attach after a restart admits again."""
    r = record.resources
    return CreateSandboxRequest(
        template=record.template,
        backend=record.backend,
        resources=ResourcesBody(
            vcpus=r.vcpus, memory_mib=r.memory_mib, disk_mib=r.disk_mib, pids=r.pids
        ),
        timeout_s=min(MAX_TIMEOUT_S, max(1.0, timeout_s)),
        metadata=record.metadata,
        network=record.network,
        trust=record.trust,
        secrets=record.secrets,
    )


def owner_of_record(record: SandboxRecord) -> Principal:
    """Who holds a sandbox's quota share when the server takes it back itself (a
    re-attach after a restart): its tenant and owner, with the server's rights, since
    the owner's own were judged when it was created."""
    return msgspec.structs.replace(
        SYSTEM, subject=record.owner or SYSTEM.subject, tenant=record.tenant
    )


def paused_detail(sandbox_id: str) -> str:
    return f"sandbox {sandbox_id} is paused; resume it first (tartarus resume {sandbox_id})"


def check_limits(resources: Resources, limits: Resources | None, template: str) -> None:
    if limits is None:
        return
    over = [
        f"{name} {getattr(resources, name)} > {getattr(limits, name)}"
        for name in ("vcpus", "memory_mib", "disk_mib", "pids")
        if getattr(resources, name) > getattr(limits, name)
    ]
    if over:
        raise ConflictError(
            f"the {template} template allows at most: {', '.join(over)}",
            slug="over-template-limits",
        )


def cursor_from(value: str | None) -> int:
    if not value:
        return 0
    try:
        return decode_cursor(value)
    except StoreError as e:
        raise InvalidRequestError(str(e), slug="invalid-cursor") from e
