"""Sandbox records and idempotency keys in SQLite (WAL), with numbered migrations.

Writes are small and rare next to reads (which the manager serves from memory), so
the store uses the synchronous sqlite3 module directly: a WAL commit with
`synchronous=NORMAL` does not fsync, and keeping it on the event loop keeps every
state change ordered with the request that caused it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

from tartarus.api.sandbox import Ending, OnTimeout
from tartarus.errors import TartarusError
from tartarus.runtime.types import Backend, Resources, SandboxState, TrustLevel
from tartarus.sqlite_wal import open_db

LIVE_STATES = (SandboxState.CREATED, SandboxState.RUNNING, SandboxState.PAUSED)

# Each entry upgrades the schema by one version (PRAGMA user_version); never edit one
# that has shipped, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE sandboxes (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        state      TEXT NOT NULL,
        template   TEXT NOT NULL,
        backend    TEXT NOT NULL,
        created_at REAL NOT NULL,
        ended_at   REAL,
        doc        BLOB NOT NULL
    );
    CREATE INDEX sandboxes_state ON sandboxes(state, seq);
    CREATE TABLE idempotency (
        key         TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        sandbox_id  TEXT,
        created_at  REAL NOT NULL
    );
    """,
)


class StoreError(TartarusError):
    pass


class SandboxRecord(msgspec.Struct, kw_only=True):
    """What the server remembers about a sandbox (never its environment: it may hold
    secrets)."""

    id: str
    template: str
    backend: Backend
    requested_backend: Backend = Backend.AUTO
    state: SandboxState
    created_at: float
    expires_at: float | None = None
    ended_at: float | None = None
    resources: Resources = msgspec.field(default_factory=Resources)
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    network: bool = False
    trust: TrustLevel = TrustLevel.UNTRUSTED
    backend_reason: str = ""
    detail: str = ""
    # Who owns it: its tenant, and the principal that created it.
    tenant: str = "default"
    owner: str = ""
    # Environment variable → secret reference (never the value), resolved at exec time.
    secrets: dict[str, str] = msgspec.field(default_factory=dict)
    # The node agent that runs it (many hosts; empty on a single host).
    node: str = ""
    # Checkpoint (snapshot) the sandbox when it is stopped, before its teardown.
    checkpoint_on_stop: bool = False
    # Paused (Hypnos): since when, the timeout left when it paused (the clock stops),
    # and the snapshot that holds it ("" when it is frozen in place, on the jail).
    paused_at: float | None = None
    remaining_s: float | None = None
    pause_snapshot: str = ""
    on_timeout: OnTimeout = OnTimeout.KILL
    auto_pause_after_s: float | None = None
    # The timeout it was given, which a sandbox its timeout paused gets again on resume.
    timeout_s: float | None = None
    # How it ended, once it has.
    ending: Ending | None = None
    # The SIGTERM grace a stop that does not say gives it (from its create or template).
    stop_grace_s: float = 0.0
    # The template's working directory, where commands run unless they say otherwise
    # (kept so a server that re-attaches to the sandbox after a restart knows it).
    workdir: str = "/"
    # A node agent's store counts every change it makes and reports: its reports and
    # its answers to work travel apart and are retried, so the fleet ignores one older
    # than what it applied (0: a node that does not count, applied as it comes).
    revision: int = 0
    # A fleet's sandbox waiting for a node: when its current job's placement deadline
    # passes (each reschedule sets a new one; 0 where there is none).
    place_by: float = 0.0
    # A fleet's sandbox recorded before its job was queued: the encoded job, until the
    # queueing succeeded. A retry of its create (same idempotency key) that finds it
    # queues it: the API server that recorded it may have died before it could.
    pending_job: bytes = b""
    seq: int = 0

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


class ListFilter(msgspec.Struct, kw_only=True, frozen=True):
    # None: every tenant's sandboxes.
    tenant: str | None = None
    states: tuple[SandboxState, ...] = ()
    template: str | None = None
    backend: Backend | None = None
    metadata: tuple[tuple[str, str], ...] = ()


def encode_cursor(seq: int) -> str:
    return str(seq)


def decode_cursor(cursor: str) -> int:
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
        raise StoreError(f"invalid cursor {cursor!r}: pass next_cursor from a listing")
    return int(cursor)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path)
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(SandboxRecord)

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this tartarus "
                f"({len(MIGRATIONS)}); upgrade tartarus or use another state_dir"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        return int(version)

    def close(self) -> None:
        self._db.close()

    def ping(self) -> None:
        self._db.execute("SELECT 1").fetchone()

    # --- sandboxes ---------------------------------------------------------------------

    def insert(self, record: SandboxRecord) -> SandboxRecord:
        cur = self._db.execute(
            "INSERT INTO sandboxes (id, state, template, backend, created_at, ended_at, doc)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.state.value,
                record.template,
                record.backend.value,
                record.created_at,
                record.ended_at,
                self._encoder.encode(record),
            ),
        )
        record.seq = int(cur.lastrowid or 0)
        return record

    def save(self, record: SandboxRecord) -> None:
        self._db.execute(
            "UPDATE sandboxes SET state=?, backend=?, ended_at=?, doc=? WHERE id=?",
            (
                record.state.value,
                record.backend.value,
                record.ended_at,
                self._encoder.encode(record),
                record.id,
            ),
        )

    def _decode(self, seq: int, doc: bytes) -> SandboxRecord:
        record = self._decoder.decode(doc)
        record.seq = seq
        return record

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        row = self._db.execute(
            "SELECT seq, doc FROM sandboxes WHERE id=?", (sandbox_id,)
        ).fetchone()
        return None if row is None else self._decode(row[0], row[1])

    def live(self) -> list[SandboxRecord]:
        marks = ",".join("?" * len(LIVE_STATES))
        rows = self._db.execute(
            f"SELECT seq, doc FROM sandboxes WHERE state IN ({marks}) ORDER BY seq",  # noqa: S608
            [s.value for s in LIVE_STATES],
        ).fetchall()
        return [self._decode(seq, doc) for seq, doc in rows]

    def list(
        self, flt: ListFilter, *, after_seq: int = 0, limit: int = 100
    ) -> tuple[list[SandboxRecord], int | None]:
        """Records in creation order after `after_seq`; returns (page, next seq or None)."""
        where = ["seq > ?"]
        args: list[object] = [after_seq]
        if flt.states:
            where.append(f"state IN ({','.join('?' * len(flt.states))})")
            args.extend(s.value for s in flt.states)
        if flt.tenant is not None:
            where.append("COALESCE(json_extract(doc, '$.tenant'), 'default') = ?")
            args.append(flt.tenant)
        if flt.template is not None:
            where.append("template = ?")
            args.append(flt.template)
        if flt.backend is not None:
            where.append("backend = ?")
            args.append(flt.backend.value)
        for key, value in flt.metadata:
            where.append("json_extract(doc, ?) = ?")
            args.extend([f'$.metadata."{key}"', value])
        args.append(limit + 1)
        rows = self._db.execute(
            f"SELECT seq, doc FROM sandboxes WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY seq LIMIT ?",
            args,
        ).fetchall()
        page = [self._decode(seq, doc) for seq, doc in rows[:limit]]
        more = len(rows) > limit
        return page, (page[-1].seq if more and page else None)

    def purge_ended(self, before: float) -> int:
        """Forgets sandboxes that ended before `before` (unix seconds)."""
        cur = self._db.execute(
            "DELETE FROM sandboxes WHERE ended_at IS NOT NULL AND ended_at < ?", (before,)
        )
        self._db.execute("DELETE FROM idempotency WHERE created_at < ?", (before,))
        return cur.rowcount

    # --- idempotency keys -----------------------------------------------------------------

    def claim_key(self, key: str, fingerprint: str) -> tuple[str, str | None] | None:
        """Claims `key` for a new create; if it was claimed before, returns its
        (fingerprint, sandbox id or None while that create is still running)."""
        try:
            self._db.execute(
                "INSERT INTO idempotency (key, fingerprint, sandbox_id, created_at)"
                " VALUES (?, ?, NULL, ?)",
                (key, fingerprint, time.time()),
            )
        except sqlite3.IntegrityError:
            row = self._db.execute(
                "SELECT fingerprint, sandbox_id FROM idempotency WHERE key=?", (key,)
            ).fetchone()
            return (row[0], row[1])
        return None

    def bind_key(self, key: str, sandbox_id: str) -> None:
        self._db.execute("UPDATE idempotency SET sandbox_id=? WHERE key=?", (sandbox_id, key))

    def release_key(self, key: str) -> None:
        self._db.execute("DELETE FROM idempotency WHERE key=? AND sandbox_id IS NULL", (key,))

    def release_unbound_keys(self) -> None:
        """Drops claims whose create never finished (the server died during it)."""
        self._db.execute("DELETE FROM idempotency WHERE sandbox_id IS NULL")


def states_of(values: Iterable[str]) -> tuple[SandboxState, ...]:
    return tuple(SandboxState(v) for v in values)
