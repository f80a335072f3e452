"""The API server's side of a fleet: every `tartarus serve --state URL` runs one, and any
number of them can share one Redis (they keep nothing that matters in memory).

A create comes in through the intake (`intake`: admitted, recorded, queued in its lane),
is taken by a scheduler worker of any API server (`placement`: placed by Moirai on a
node whose capacity is then reserved, sent to that node's inbox); the node agent pulls
it, creates the sandbox with its embedded manager and reports the record back
(`reports`), which ends the create's wait. Nodes that go away are reaped (`reaper`).
The sandbox routes see all of it through the fleet's directory (`directory`); every
change of a record goes through `records`, every error to `error_stream`.

The coordinator builds these parts and runs their loops: scheduler workers, the reaper,
retention, the quota sweep and the metrics.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio

from tartarus.enforcement.records import ErrorCategory
from tartarus.fleet.book import RedisBook
from tartarus.fleet.directory import FleetDirectory
from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.intake import Intake
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.placement import Placer
from tartarus.fleet.proxy import NodeProxy
from tartarus.fleet.reaper import Reaper
from tartarus.fleet.records import Records
from tartarus.fleet.reports import Reports
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import FleetState

log = logging.getLogger(__name__)


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
        self.server_id = f"api-{secrets.token_hex(4)}"
        self.proxy = NodeProxy(join_token, node_tls)
        self.metrics = FleetMetrics(state)
        self.errors = ErrorStream(state, self.metrics)
        self.records = Records(state)
        self.intake = Intake(state, settings, self.records, self.errors, self.metrics)
        self.placer = Placer(state, settings, self.records, self.errors, self.metrics)
        self.reports = Reports(state, self.records, self.errors, self.metrics)
        self.reaper = Reaper(state, settings, self.records, self.errors)
        self.directory = FleetDirectory(state, self.records, self.intake, self.proxy)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Scheduler workers, the reaper, retention and metrics, until the block exits."""
        async with anyio.create_task_group() as tg:
            for worker in range(self.settings.schedulers):
                tg.start_soon(
                    self._forever, self.placer.schedule_once, f"{self.server_id}-{worker}"
                )
            tg.start_soon(self._every, self.settings.heartbeat_ttl_s / 2, self.reaper.reap)
            tg.start_soon(self._every, 60.0, self.reaper.purge)
            tg.start_soon(self._every, 30.0, self.records.settle_quota)
            tg.start_soon(self._every, 60.0, self.reaper.fail_stranded)
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
                await self.errors.error(
                    ErrorCategory.INTERNAL, f"{type(e).__name__}: {e}", trace=True
                )
                await anyio.sleep(1.0)

    async def _every(self, period_s: float, step: Callable[[], object]) -> None:
        async def once() -> None:
            await step()  # type: ignore[misc]
            await anyio.sleep(period_s)

        await self._forever(once)
