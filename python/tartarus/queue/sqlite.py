"""The embedded queue: one SQLite (WAL) table, shared by every process on the host.

A delivery is a row update inside an IMMEDIATE transaction (SQLite's write lock), so two
consumers never take the same message at once; `visible_at` is the visibility timeout.
Consumers in this process wake at once on `put`; consumers in other processes poll.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from tartarus.queue.base import (
    LANES,
    DeadLetter,
    Lane,
    LaneDepth,
    Message,
    QueueError,
    QueueFullError,
    QueueSettings,
    poison_reason,
)
from tartarus.sqlite_wal import open_db

POLL_S = 0.05

SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    body        BLOB NOT NULL,
    enqueued_at REAL NOT NULL,
    deliveries  INTEGER NOT NULL DEFAULT 0,
    visible_at  REAL NOT NULL,
    consumer    TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_next
    ON queue_messages(queue, priority, seq);
CREATE TABLE IF NOT EXISTS queue_dead (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL,
    queue       TEXT NOT NULL,
    lane        TEXT NOT NULL,
    body        BLOB NOT NULL,
    reason      TEXT NOT NULL,
    deliveries  INTEGER NOT NULL,
    failed_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_dead_by_queue ON queue_dead(queue, seq);
"""


class SqliteQueue:
    def __init__(
        self,
        path: Path,
        name: str,
        settings: QueueSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._settings = settings or QueueSettings()
        self._clock = clock
        self._db = open_db(path)
        self._db.executescript(SCHEMA)
        self._changed: anyio.Event | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> QueueSettings:
        return self._settings

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _change_event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    async def put(self, body: bytes, lane: Lane = Lane.MAIN) -> str:
        now = self._clock()
        with immediate(self._db):
            (depth,) = self._db.execute(
                "SELECT count(*) FROM queue_messages WHERE queue=? AND priority=?",
                (self._name, LANES.index(lane)),
            ).fetchone()
            if depth >= self._settings.max_depth:
                raise QueueFullError(self._name, lane, depth, self._settings.max_depth)
            cur = self._db.execute(
                "INSERT INTO queue_messages (queue, priority, body, enqueued_at, visible_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (self._name, LANES.index(lane), body, now, now),
            )
        self._wake()
        return str(cur.lastrowid)

    def _take(self, consumer: str) -> Message | None:
        """One delivery attempt: the best visible message, or None. Messages over the
        delivery limit are dead-lettered on the way."""
        while True:
            now = self._clock()
            with immediate(self._db):
                row = self._db.execute(
                    "SELECT seq, priority, body, enqueued_at, deliveries FROM queue_messages"
                    " WHERE queue=? AND visible_at<=? ORDER BY priority, seq LIMIT 1",
                    (self._name, now),
                ).fetchone()
                if row is None:
                    return None
                seq, priority, body, enqueued_at, deliveries = row
                lane = LANES[priority]
                if deliveries >= self._settings.max_deliveries:
                    self._bury(seq, lane, body, poison_reason(deliveries, self._settings))
                    continue
                self._db.execute(
                    "UPDATE queue_messages SET deliveries=deliveries+1, visible_at=?, consumer=?"
                    " WHERE seq=?",
                    (now + self._settings.visibility_timeout_s, consumer, seq),
                )
            return Message(
                id=str(seq),
                lane=lane,
                body=body,
                enqueued_at=enqueued_at,
                deliveries=deliveries + 1,
                consumer=consumer,
            )

    async def get(self, consumer: str, *, timeout_s: float) -> Message | None:
        deadline = anyio.current_time() + timeout_s
        while True:
            changed = self._change_event()
            message = self._take(consumer)
            if message is not None:
                return message
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            with anyio.move_on_after(min(remaining, POLL_S)):
                await changed.wait()

    async def ack(self, message: Message) -> None:
        self._db.execute("DELETE FROM queue_messages WHERE seq=?", (int(message.id),))

    async def retry(self, message: Message, reason: str) -> None:
        if message.deliveries >= self._settings.max_deliveries:
            await self.bury(
                message, f"{reason}; {poison_reason(message.deliveries, self._settings)}"
            )
            return
        self._db.execute(
            "UPDATE queue_messages SET visible_at=?, consumer=NULL WHERE seq=?",
            (self._clock(), int(message.id)),
        )
        self._wake()

    def _bury(self, seq: int, lane: Lane, body: bytes, reason: str) -> None:
        row = self._db.execute(
            "DELETE FROM queue_messages WHERE seq=? RETURNING deliveries", (seq,)
        ).fetchone()
        if row is None:
            return  # acknowledged or buried by someone else meanwhile
        self._db.execute(
            "INSERT INTO queue_dead (id, queue, lane, body, reason, deliveries, failed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (str(seq), self._name, lane.value, body, reason, row[0], self._clock()),
        )

    async def bury(self, message: Message, reason: str) -> None:
        with immediate(self._db):
            self._bury(int(message.id), message.lane, message.body, reason)

    async def extend(self, message: Message) -> None:
        self._db.execute(
            "UPDATE queue_messages SET visible_at=? WHERE seq=?",
            (self._clock() + self._settings.visibility_timeout_s, int(message.id)),
        )

    async def drain(self) -> list[Message]:
        rows = self._db.execute(
            "DELETE FROM queue_messages WHERE queue=?"
            " RETURNING seq, priority, body, enqueued_at, deliveries",
            (self._name,),
        ).fetchall()
        return [
            Message(id=str(seq), lane=LANES[p], body=body, enqueued_at=at, deliveries=n)
            for seq, p, body, at, n in sorted(rows, key=lambda r: (r[1], r[0]))
        ]

    async def depth(self) -> dict[Lane, LaneDepth]:
        now = self._clock()
        rows = self._db.execute(
            "SELECT priority, sum(visible_at<=?), sum(visible_at>?) FROM queue_messages"
            " WHERE queue=? GROUP BY priority",
            (now, now, self._name),
        ).fetchall()
        out = {lane: LaneDepth(waiting=0, in_flight=0) for lane in LANES}
        for priority, waiting, in_flight in rows:
            out[LANES[priority]] = LaneDepth(waiting=waiting or 0, in_flight=in_flight or 0)
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute(
            "SELECT id, lane, body, reason, deliveries, failed_at FROM queue_dead"
            " WHERE queue=? ORDER BY seq DESC LIMIT ?",
            (self._name, limit),
        ).fetchall()
        return [
            DeadLetter(
                id=id_,
                queue=self._name,
                lane=Lane(lane),
                body=body,
                reason=reason,
                deliveries=deliveries,
                failed_at=failed_at,
            )
            for id_, lane, body, reason, deliveries, failed_at in rows
        ]

    async def close(self) -> None:
        self._db.close()


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        raise QueueError(f"the database {db} is busy or unusable: {e}") from e
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
