"""Acheron under crashes: a Hypothesis state machine drives real consumer processes.

Producers put into random lanes; consumer processes (tests/support/queue_worker.py) take
and acknowledge; a rule kills a consumer with SIGKILL between its `get` and its `ack`.
Whatever the interleaving and however long anything takes:

- a message never delivered before comes out in lane order: never while a message never
  delivered before waits in a higher lane, and first-in first-out within its lane;
- `get` finds nothing only when no never-delivered message waits;
- a message is delivered again only if it was delivered before and not acknowledged;
- at the end, after the visibility timeout, every message put is acknowledged: none lost.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tartarus.queue import LANES, Lane, QueueSettings, WorkQueue
from tartarus.queue.redis_streams import RedisQueue
from tartarus.queue.sqlite import SqliteQueue
from tests.support.redis_server import RedisServer

# Longer than any run: a message comes back only when the test says so (hypothesis needs
# every step to be deterministic, so nothing may expire at a moment the load decides).
VISIBILITY_S = 120.0
WORKERS = 2
WORKER = Path(__file__).parent / "support" / "queue_worker.py"
REPO = Path(__file__).resolve().parent.parent


class Worker:
    def __init__(self, backend: str, location: str, queue: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), backend, location, queue, str(VISIBILITY_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        )
        assert self.ask(None) == {"ready": True}
        self.held: list[str] = []

    def ask(self, command: str | None) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        if command is not None:
            self.process.stdin.write(command.encode() + b"\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"worker {self.process.pid} died"
        return json.loads(line)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


class QueueUnderCrashes(RuleBasedStateMachine):
    backend: ClassVar[str]
    location: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.name = f"prop-{uuid.uuid4().hex[:8]}"
        self.portal_cm = start_blocking_portal()
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        self.queue = self.portal.call(self._open)
        self.workers = [Worker(self.backend, self.location, self.name) for _ in range(WORKERS)]
        self.counter = 0
        # Bodies never delivered, per lane, in put order.
        self.fresh: dict[Lane, list[str]] = {lane: [] for lane in LANES}
        self.put_all: set[str] = set()
        self.delivered: set[str] = set()
        self.acked: set[str] = set()

    async def _open(self, *, expired: bool = False) -> WorkQueue:
        """The producer's queue; `expired` opens one that sees every delivered message's
        visibility timeout as passed (a consumer arriving after the crashed ones)."""
        visibility = 0.001 if expired and self.backend == "redis" else VISIBILITY_S
        settings = QueueSettings(visibility_timeout_s=visibility, max_deliveries=1000)
        if self.backend == "redis":
            return RedisQueue(aioredis.Redis.from_url(self.location), self.name, settings)
        later = VISIBILITY_S + 1 if expired else 0.0
        return SqliteQueue(
            Path(self.location), self.name, settings, clock=lambda: time.time() + later
        )

    @rule(lane=st.sampled_from(LANES))
    def put(self, lane: Lane) -> None:
        self.counter += 1
        body = f"m{self.counter}"
        self.portal.call(self.queue.put, body.encode(), lane)
        self.fresh[lane].append(body)
        self.put_all.add(body)

    @rule(index=st.integers(0, WORKERS - 1))
    def get(self, index: int) -> None:
        worker = self.workers[index]
        answer = worker.ask("get")
        if answer.get("none"):
            assert not any(self.fresh.values()), "a waiting message was not delivered"
            return
        body, lane = answer["body"], Lane(answer["lane"])
        assert body in self.put_all
        higher = LANES[: LANES.index(lane)]
        assert not any(self.fresh[h] for h in higher), f"{body} ({lane}) overtook a higher lane"
        if body in self.delivered:
            assert answer["deliveries"] >= 2
            assert body not in self.acked or answer["deliveries"] >= 2
        else:
            assert answer["deliveries"] == 1
            assert self.fresh[lane] and self.fresh[lane][0] == body, "not first-in first-out"
            self.fresh[lane].pop(0)
            self.delivered.add(body)
        worker.held.append(answer["id"] + " " + body)

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(index=st.integers(0, WORKERS - 1))
    def ack(self, index: int) -> None:
        worker = self.workers[index]
        if not worker.held:
            return
        message_id, body = worker.held.pop(0).split()
        assert worker.ask(f"ack {message_id}") == {"ok": True}
        self.acked.add(body)

    @precondition(lambda self: any(w.held for w in self.workers))
    @rule(index=st.integers(0, WORKERS - 1))
    def crash_between_receive_and_ack(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = Worker(self.backend, self.location, self.name)

    @invariant()
    def nothing_acknowledged_that_was_not_delivered(self) -> None:
        assert self.acked <= self.delivered <= self.put_all

    def teardown(self) -> None:
        try:
            for worker in self.workers:
                worker.kill()
            # Every message not acknowledged comes back once its visibility timeout
            # has passed, as it has for this late consumer.
            drain = self.portal.call(functools.partial(self._open, expired=True))
            while (message := self.portal.call(self._get, drain)) is not None:
                self.portal.call(drain.ack, message)
                self.acked.add(message.body.decode())
            self.portal.call(drain.close)
            assert self.acked == self.put_all, f"lost: {sorted(self.put_all - self.acked)}"
            self.portal.call(self.queue.close)
        finally:
            self.portal_cm.__exit__(None, None, None)

    @staticmethod
    async def _get(queue: WorkQueue) -> Any:
        return await queue.get("drain", timeout_s=0.2)


RUN = settings(
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.timeout(240)
def test_sqlite_queue_under_crashes(tmp_path: Path) -> None:
    class SqliteQueueUnderCrashes(QueueUnderCrashes):
        backend = "sqlite"
        location = str(tmp_path / "queue.db")

    RUN(SqliteQueueUnderCrashes).TestCase().runTest()


@pytest.mark.timeout(240)
def test_redis_queue_under_crashes(redis: RedisServer) -> None:
    class RedisQueueUnderCrashes(QueueUnderCrashes):
        backend = "redis"
        location = redis.url

    RUN(RedisQueueUnderCrashes).TestCase().runTest()
