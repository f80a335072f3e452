"""Hecatoncheir on a worker host: `tartarus agent --join URL --token TOKEN`.

The agent is a `tartarus serve` (the same embedded node agent, SQLite store and `/v1`
API, on TCP with the token as its API key) plus this plugin, which:

- joins the fleet through any of the API servers it was given, heartbeats (with the
  host's CPU and memory use), and joins again when an API server forgets it; a network
  cut only delays this, the sandboxes keep running;
- pulls work from its inbox and creates each sandbox under the id the scheduler chose
  (a redelivered item whose sandbox exists is answered, not created twice);
- reports every change of its sandboxes' records, enforcement events and errors, in
  order, retrying until an API server takes them;
- runs the Furies (Erinyes) over its sandboxes;
- on SIGTERM drains: it stops taking work, tells the fleet it is draining, waits for its
  sandboxes to end (up to the drain timeout), stops the rest, reports, and leaves.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from tartarus.auth.principal import SYSTEM
from tartarus.enforcement.limits import LimitEnforcer
from tartarus.enforcement.records import (
    Action,
    EnforcementEvent,
    ErrorRecord,
    Fury,
    LimitPolicy,
    PeakUse,
)
from tartarus.fleet.host_metrics import CountingStore, HostMetrics
from tartarus.fleet.host_usage import HostUsage
from tartarus.fleet.join_credentials import ClientTls, JoinCredentials
from tartarus.fleet.wire import (
    Heartbeat,
    Job,
    JoinReply,
    NodeReport,
    WorkBatch,
    WorkDone,
    WorkRequest,
    WorkVerdict,
)
from tartarus.node.manager import SandboxManager
from tartarus.node.store import SandboxRecord
from tartarus.queue import Message
from tartarus.runtime.types import SandboxState
from tartarus.scheduling.nodes import NodeSpec, NodeUsage
from tartarus.server.routing import RouteTable

log = logging.getLogger(__name__)

T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
_jobs = msgspec.json.Decoder(Job)

REQUEST_TIMEOUT_S = 40.0
MAX_BACKOFF_S = 5.0
REPORT_BATCH = 200
# How long a request for work waits on the API server for the first item.
LONG_POLL_S = 5.0


class Outbox:
    """What the node has to tell the fleet, oldest first; kept until an API server took it."""

    def __init__(self) -> None:
        self.records: dict[str, SandboxRecord] = {}
        self.events: list[EnforcementEvent] = []
        self.errors: list[ErrorRecord] = []
        self.peaks: list[PeakUse] = []
        self._ready: anyio.Event | None = None

    def _wake(self) -> None:
        if self._ready is not None:
            self._ready.set()

    def record(self, record: SandboxRecord) -> None:
        # A later state of the same sandbox replaces an unsent earlier one.
        self.records.pop(record.id, None)
        self.records[record.id] = copy.copy(record)
        self._wake()

    def event(self, event: EnforcementEvent) -> None:
        self.events.append(event)
        self._wake()

    def error(self, error: ErrorRecord) -> None:
        self.errors.append(error)
        self._wake()

    def peak(self, peak: PeakUse) -> None:
        self.peaks.append(peak)
        self._wake()

    def __bool__(self) -> bool:
        return bool(self.records or self.events or self.errors or self.peaks)

    async def wait(self) -> None:
        while not self:
            self._ready = anyio.Event()
            await self._ready.wait()
        self._ready = None

    def take(self) -> NodeReport:
        records = list(self.records.values())[:REPORT_BATCH]
        return NodeReport(
            records=records,
            events=self.events[:REPORT_BATCH],
            errors=self.errors[:REPORT_BATCH],
            peaks=self.peaks[:REPORT_BATCH],
        )

    def sent(self, report: NodeReport) -> None:
        for r in report.records:
            if self.records.get(r.id) == r:
                del self.records[r.id]
        del self.events[: len(report.events)]
        del self.errors[: len(report.errors)]
        del self.peaks[: len(report.peaks)]


class ReportingStore(CountingStore):
    """The node's own SQLite store, which also hands every change to the outbox (and
    counts launches for the node's `/metrics`)."""

    def __init__(self, path: Path, metrics: HostMetrics, outbox: Outbox, node_id: str) -> None:
        super().__init__(path, metrics)
        self.outbox = outbox
        self.node_id = node_id

    def insert(self, record: SandboxRecord) -> SandboxRecord:
        record.node = self.node_id
        record.revision += 1
        inserted = super().insert(record)
        self.outbox.record(inserted)
        return inserted

    def save(self, record: SandboxRecord) -> None:
        record.node = self.node_id
        record.revision += 1
        super().save(record)
        self.outbox.record(record)
        if record.state is SandboxState.STOPPED and record.detail == "timed out":
            late = (record.ended_at or time.time()) - (record.expires_at or time.time())
            self.outbox.event(
                EnforcementEvent(
                    fury=Fury.TIMEOUT,
                    action=Action.KILL,
                    sandbox_id=record.id,
                    detail=f"killed {late:.3f} s after its deadline",
                    tenant=record.tenant,
                    value=late,
                )
            )


class AgentOptions(msgspec.Struct, frozen=True, kw_only=True):
    join: list[str]
    credentials: JoinCredentials
    # Sandboxes created at once.
    concurrency: int = 8
    drain_timeout_s: float = 30.0
    limits: LimitPolicy = msgspec.field(default_factory=LimitPolicy)


class FleetUnreachableError(Exception):
    pass


class NodeAgent:
    """The plugin that makes a `tartarus serve` a fleet node (see module docstring)."""

    def __init__(self, options: AgentOptions, spec: NodeSpec, outbox: Outbox) -> None:
        self.options = options
        self.spec = spec
        self.outbox = outbox
        self.node_id = spec.id
        self._listening = anyio.Event()
        self.draining = False
        self._url_index = 0
        self._session: aiohttp.ClientSession | None = None
        self._usage = HostUsage()
        self._tls = ClientTls(options.credentials)
        self._joined = anyio.Event()
        self._heartbeat_s = 1.0

    def listening(self, address: str) -> None:
        """The node's API listens; API servers reach it at `address`."""
        if not self.spec.address:
            self.spec = msgspec.structs.replace(self.spec, address=address)
        self._listening.set()

    def middlewares(self) -> list[Middleware]:
        return []

    def route_tables(self) -> list[RouteTable]:
        return []

    # --- talking to the fleet -----------------------------------------------------------

    @property
    def _base(self) -> str:
        return self.options.join[self._url_index % len(self.options.join)].rstrip("/")

    def _next_server(self) -> None:
        self._url_index += 1

    async def _client(self) -> aiohttp.ClientSession:
        """The session to the API servers, made again when the agent's certificate files
        change (a renewed certificate is used from the next request on)."""
        if self._session is not None and self._tls.changed():
            await self._session.close()
            self._session = None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, sock_connect=5.0),
                connector=aiohttp.TCPConnector(ssl=self._tls.context() or True),
            )
        return self._session

    async def _call(
        self, method: str, path: str, body: Any = None, reply: type[T] | None = None
    ) -> T | None:
        """One request to the current API server; raises FleetUnreachableError (and moves
        to the next server) when it cannot be reached or fails, KeyError on 404."""
        session = await self._client()
        try:
            async with session.request(
                method,
                self._base + path,
                data=None if body is None else _encode(body),
                headers={
                    **self.options.credentials.headers(),
                    "Content-Type": "application/json",
                },
            ) as response:
                raw = await response.read()
                if response.status == 404:
                    raise KeyError(path)
                if response.status >= 400:
                    raise FleetUnreachableError(
                        f"{method} {path}: HTTP {response.status}: {raw[:300]!r}"
                    )
                return None if reply is None else msgspec.json.decode(raw, type=reply)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self._next_server()
            raise FleetUnreachableError(f"{method} {path}: {e}{self._tls.hint()}") from e

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retries `call` with backoff until it gets through (a network cut ends)."""
        backoff = 0.2
        while True:
            try:
                return await call()
            except FleetUnreachableError as e:
                log.warning("%s: %s; retrying in %.1f s", what, e, backoff)
                await anyio.sleep(backoff)
                # Never wait longer than a heartbeat: after a cut, the node must be back
                # within the TTL or the fleet gives its sandboxes up.
                backoff = min(backoff * 2, MAX_BACKOFF_S, self._heartbeat_s)

    # --- the loops ------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self, manager: SandboxManager, app: web.Application) -> AsyncIterator[None]:
        del app
        await self._client()
        enforcer = LimitEnforcer(manager, self.options.limits, self.outbox)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stay_joined, manager)
                tg.start_soon(self._report_forever)
                tg.start_soon(enforcer.watch_forever)
                pulling = anyio.CancelScope()
                tg.start_soon(self._pull_forever, manager, pulling)
                try:
                    yield
                finally:
                    with anyio.CancelScope(shield=True):
                        pulling.cancel()
                        await self._drain(manager)
                    tg.cancel_scope.cancel()
        finally:
            if self._session is not None:
                await self._session.close()

    async def _stay_joined(self, manager: SandboxManager) -> None:
        await self._listening.wait()
        while True:
            joined = await self._retrying(
                "joining the fleet",
                lambda: self._call("POST", "/v1/nodes", self.spec, JoinReply),
            )
            assert joined is not None
            self._heartbeat_s = joined.heartbeat_s
            await self._fence(manager, set(joined.expected))
            self._joined.set()
            log.info("node %s joined the fleet through %s", self.node_id, self._base)
            try:
                while True:
                    await anyio.sleep(self._heartbeat_s)
                    await self._retrying("heartbeat", lambda: self._beat(manager))
            except KeyError:
                log.warning("the fleet forgot node %s; joining again", self.node_id)

    async def _beat(self, manager: SandboxManager) -> None:
        usage = NodeUsage(
            sandboxes=manager.live_count(),
            cpu_utilisation=self._usage.cpu(),
            memory_utilisation=self._usage.memory(),
        )
        await self._call(
            "POST",
            f"/v1/nodes/{self.node_id}/heartbeat",
            Heartbeat(usage=usage, draining=self.draining),
        )

    async def _fence(self, manager: SandboxManager, expected: set[str]) -> None:
        """Stops sandboxes the fleet no longer counts on this node (it declared them lost
        while this node was cut off, and told their clients so)."""
        for live in manager.live_sandboxes():
            if live.record.id not in expected and live.record.state is SandboxState.RUNNING:
                await manager.end(
                    live.record.id,
                    SandboxState.FAILED,
                    "the fleet declared this node lost while it was cut off",
                )

    async def _pull_forever(self, manager: SandboxManager, scope: anyio.CancelScope) -> None:
        limit = anyio.Semaphore(self.options.concurrency)
        with scope:
            await self._joined.wait()
            async with anyio.create_task_group() as tg:
                while True:
                    await limit.acquire()
                    free = 1
                    while free < self.options.concurrency and limit.value > 0:
                        await limit.acquire()
                        free += 1
                    try:
                        batch = await self._call(
                            "POST",
                            f"/v1/nodes/{self.node_id}/work",
                            WorkRequest(wait_s=LONG_POLL_S, max=free),
                            WorkBatch,
                        )
                    except (FleetUnreachableError, KeyError) as e:
                        log.debug("taking work failed: %s", e)
                        batch = None
                        await anyio.sleep(0.5)
                    items = batch.items if batch is not None else []
                    for _ in range(free - len(items)):
                        limit.release()
                    for message in items:
                        tg.start_soon(self._handle, manager, message, limit)

    async def _handle(
        self, manager: SandboxManager, message: Message, limit: anyio.Semaphore
    ) -> None:
        try:
            job = _jobs.decode(message.body)
            record = manager.store.get(job.sandbox_id)
            if record is None:
                record = await self._create(manager, job)
            verdict = await self._retrying(
                "reporting a created sandbox",
                lambda: self._call(
                    "POST",
                    f"/v1/nodes/{self.node_id}/work/done",
                    WorkDone(message=message, record=record),
                    WorkVerdict,
                ),
            )
            if verdict is not None and not verdict.keep and record.live:
                await manager.delete(record.id, grace_s=0)
        except KeyError:
            log.warning("the fleet forgot node %s while it created a sandbox", self.node_id)
        except msgspec.DecodeError:
            log.exception("undecodable work item %s", message.id)
        finally:
            limit.release()

    async def _create(self, manager: SandboxManager, job: Job) -> SandboxRecord:
        try:
            caller = msgspec.structs.replace(SYSTEM, subject=job.owner, tenant=job.tenant)
            record, _ = await manager.create(
                job.request, caller=caller, sandbox_id=job.sandbox_id, egress=job.egress
            )
        except Exception as e:
            stored = manager.store.get(job.sandbox_id)
            if stored is not None:
                return stored
            # Refused before a record was written (no such backend here, say).
            now = time.time()
            return SandboxRecord(
                id=job.sandbox_id,
                template=job.request.template,
                backend=job.request.backend,
                requested_backend=job.request.backend,
                state=SandboxState.FAILED,
                created_at=now,
                ended_at=now,
                resources=job.request.resources.to_runtime(),
                metadata=job.request.metadata,
                detail=f"could not start: {e}",
                node=self.node_id,
                tenant=job.tenant,
                owner=job.owner,
            )
        return record

    async def _report_forever(self) -> None:
        while True:
            await self.outbox.wait()
            await self._joined.wait()
            report = self.outbox.take()
            try:
                await self._retrying("reporting", lambda r=report: self._send(r))  # type: ignore[misc]
                self.outbox.sent(report)
            except KeyError:
                await anyio.sleep(self._heartbeat_s)  # rejoining; send after

    async def _send(self, report: NodeReport) -> None:
        await self._call("POST", f"/v1/nodes/{self.node_id}/report", report)

    async def _drain(self, manager: SandboxManager) -> None:
        log.info("draining: no new work; waiting up to %.0f s", self.options.drain_timeout_s)
        self.draining = True
        with anyio.move_on_after(5.0), suppress(FleetUnreachableError, KeyError):
            await self._beat(manager)
        with anyio.move_on_after(self.options.drain_timeout_s):
            while manager.live_count():  # noqa: ASYNC110 - the manager has no event for it
                await anyio.sleep(0.2)
        await manager.shutdown()
        with anyio.move_on_after(10.0):
            while self.outbox:
                report = self.outbox.take()
                try:
                    await self._send(report)
                    self.outbox.sent(report)
                except (FleetUnreachableError, KeyError):
                    await anyio.sleep(0.5)
            with suppress(FleetUnreachableError, KeyError):
                await self._call("DELETE", f"/v1/nodes/{self.node_id}")
