"""Hades: the node registry. Nodes join, heartbeat within a TTL or are removed as dead;
reservations hold a node's capacity for a sandbox from placement until it ends.

Also here, because the scheduler reads them with the nodes: the quarantine list (Typhon:
tenants or workloads flagged to run only in the quarantine pool) and heat history
(Phlegethon). `SqliteRegistry` is for one API server; `RedisRegistry`
(`registry_redis.py`) for many.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from tartarus.queue.sqlite import immediate
from tartarus.scheduling.heat import HeatHistory
from tartarus.scheduling.nodes import NodeSpec, NodeState, NodeUsage, Reservation
from tartarus.sqlite_wal import open_db

DEFAULT_TTL_S = 10.0


def capacity_refusal(node: NodeState, want: Reservation) -> str | None:
    """Why `want` does not fit on `node` now (the scheduler checks first; this re-check
    is what makes two racing schedulers safe)."""
    cap = node.spec.capacity
    if node.draining:
        return f"node {node.id} is draining"
    if node.reserved_vcpus + want.vcpus > cap.vcpus + 1e-9:
        return f"node {node.id} has no {want.vcpus:g} vCPUs free"
    if node.reserved_memory_mib + want.memory_mib > cap.memory_mib:
        return f"node {node.id} has no {want.memory_mib} MiB free"
    if len(node.reservations) >= cap.max_sandboxes:
        return f"node {node.id} is full"
    return None


class Registry(Protocol):
    @property
    def ttl_s(self) -> float: ...

    async def register(self, spec: NodeSpec) -> None:
        """Adds or refreshes a node (a rejoin keeps its reservations)."""
        ...

    async def heartbeat(self, node_id: str, usage: NodeUsage, *, draining: bool) -> bool:
        """Refreshes the node's TTL; False if the node is unknown (it must register)."""
        ...

    async def nodes(self) -> list[NodeState]:
        """Every live node with its reservations."""
        ...

    async def node(self, node_id: str) -> NodeState | None: ...

    async def reserve(self, node_id: str, reservation: Reservation) -> str | None:
        """Holds capacity on the node; None when held (also when already held), else why not."""
        ...

    async def release(self, sandbox_id: str) -> bool:
        """Frees the sandbox's reservation; False if it held none."""
        ...

    async def reap(self) -> list[NodeState]:
        """Removes nodes whose heartbeat is older than the TTL; each removed node (with
        the reservations it held) is returned to exactly one caller."""
        ...

    async def deregister(self, node_id: str) -> NodeState | None: ...

    async def quarantine(self, subject: str, reason: str) -> None: ...

    async def release_quarantine(self, subject: str) -> bool: ...

    async def quarantined(self) -> dict[str, str]:
        """Flagged subjects (`tenant:NAME`, `template:NAME`, `group:NAME`) and why."""
        ...

    async def heat_history(self, key: str) -> HeatHistory | None: ...

    async def record_heat(self, key: str, cpu_share: float, memory_share: float) -> None: ...

    async def close(self) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id        TEXT PRIMARY KEY,
    spec      BLOB NOT NULL,
    usage     BLOB NOT NULL,
    draining  INTEGER NOT NULL DEFAULT 0,
    joined_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    sandbox_id TEXT PRIMARY KEY,
    node_id    TEXT NOT NULL,
    doc        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_by_node ON reservations(node_id);
CREATE TABLE IF NOT EXISTS quarantine (
    subject TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS heat (
    key TEXT PRIMARY KEY,
    doc BLOB NOT NULL
);
"""


class SqliteRegistry:
    def __init__(
        self, path: Path, *, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = open_db(path)
        self._db.executescript(SCHEMA)
        self._ttl_s = ttl_s
        self._clock = clock

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    async def register(self, spec: NodeSpec) -> None:
        now = self._clock()
        self._db.execute(
            "INSERT INTO nodes (id, spec, usage, draining, joined_at, last_seen)"
            " VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " spec=excluded.spec, draining=0, last_seen=excluded.last_seen",
            (spec.id, msgspec.json.encode(spec), msgspec.json.encode(NodeUsage()), now, now),
        )

    async def heartbeat(self, node_id: str, usage: NodeUsage, *, draining: bool) -> bool:
        cur = self._db.execute(
            "UPDATE nodes SET usage=?, draining=?, last_seen=? WHERE id=? AND last_seen>=?",
            (
                msgspec.json.encode(usage),
                int(draining),
                self._clock(),
                node_id,
                self._clock() - self._ttl_s,
            ),
        )
        return cur.rowcount == 1

    def _state(self, row: tuple[str, bytes, bytes, int, float, float]) -> NodeState:
        node_id, spec, usage, draining, joined_at, last_seen = row
        docs = self._db.execute(
            "SELECT doc FROM reservations WHERE node_id=? ORDER BY rowid", (node_id,)
        ).fetchall()
        return NodeState(
            spec=msgspec.json.decode(spec, type=NodeSpec),
            usage=msgspec.json.decode(usage, type=NodeUsage),
            reservations=[msgspec.json.decode(d, type=Reservation) for (d,) in docs],
            draining=bool(draining),
            joined_at=joined_at,
            last_seen=last_seen,
        )

    async def nodes(self) -> list[NodeState]:
        rows = self._db.execute(
            "SELECT id, spec, usage, draining, joined_at, last_seen FROM nodes"
            " WHERE last_seen>=? ORDER BY id",
            (self._clock() - self._ttl_s,),
        ).fetchall()
        return [self._state(row) for row in rows]

    async def node(self, node_id: str) -> NodeState | None:
        row = self._db.execute(
            "SELECT id, spec, usage, draining, joined_at, last_seen FROM nodes"
            " WHERE id=? AND last_seen>=?",
            (node_id, self._clock() - self._ttl_s),
        ).fetchone()
        return None if row is None else self._state(row)

    async def reserve(self, node_id: str, reservation: Reservation) -> str | None:
        with immediate(self._db):
            held = self._db.execute(
                "SELECT node_id FROM reservations WHERE sandbox_id=?", (reservation.sandbox_id,)
            ).fetchone()
            if held is not None:
                return None if held[0] == node_id else f"already reserved on node {held[0]}"
            node = await self.node(node_id)
            why = f"node {node_id} is gone" if node is None else capacity_refusal(node, reservation)
            if why is None:
                self._db.execute(
                    "INSERT INTO reservations (sandbox_id, node_id, doc) VALUES (?, ?, ?)",
                    (reservation.sandbox_id, node_id, msgspec.json.encode(reservation)),
                )
        return why

    async def release(self, sandbox_id: str) -> bool:
        cur = self._db.execute("DELETE FROM reservations WHERE sandbox_id=?", (sandbox_id,))
        return cur.rowcount == 1

    def _remove(self, node_id: str, seen_before: float) -> NodeState | None:
        """Removes the node if its last heartbeat is older than `seen_before`."""
        with immediate(self._db):
            row = self._db.execute(
                "SELECT id, spec, usage, draining, joined_at, last_seen FROM nodes"
                " WHERE id=? AND last_seen<?",
                (node_id, seen_before),
            ).fetchone()
            state = None if row is None else self._state(row)
            if state is not None:
                self._db.execute("DELETE FROM reservations WHERE node_id=?", (node_id,))
                self._db.execute("DELETE FROM nodes WHERE id=?", (node_id,))
        return state

    async def reap(self) -> list[NodeState]:
        cutoff = self._clock() - self._ttl_s
        ids = [r[0] for r in self._db.execute("SELECT id FROM nodes WHERE last_seen<?", (cutoff,))]
        removed = [self._remove(node_id, cutoff) for node_id in ids]
        return [s for s in removed if s is not None]

    async def deregister(self, node_id: str) -> NodeState | None:
        return self._remove(node_id, float("inf"))

    async def quarantine(self, subject: str, reason: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO quarantine (subject, reason, at) VALUES (?, ?, ?)",
            (subject, reason, self._clock()),
        )

    async def release_quarantine(self, subject: str) -> bool:
        return self._db.execute("DELETE FROM quarantine WHERE subject=?", (subject,)).rowcount == 1

    async def quarantined(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT subject, reason FROM quarantine").fetchall())

    async def heat_history(self, key: str) -> HeatHistory | None:
        row = self._db.execute("SELECT doc FROM heat WHERE key=?", (key,)).fetchone()
        return None if row is None else msgspec.json.decode(row[0], type=HeatHistory)

    async def record_heat(self, key: str, cpu_share: float, memory_share: float) -> None:
        history = await self.heat_history(key) or HeatHistory()
        updated = history.observe(cpu_share, memory_share)
        self._db.execute(
            "INSERT OR REPLACE INTO heat (key, doc) VALUES (?, ?)",
            (key, msgspec.json.encode(updated)),
        )

    async def close(self) -> None:
        self._db.close()
