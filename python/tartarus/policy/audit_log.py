"""Audit log (Aeacus): the append-only audit log, a SHA-256 hash chain in SQLite.

Every entry's `hash` is the SHA-256 of its canonical JSON, which includes its sequence
number and the previous entry's hash (`prev`); changing, removing or reordering any
entry breaks every link after it, and `verify` says where. Retention removes the oldest
entries but keeps the chain checkable: the hash of the last removed entry becomes the
anchor the first kept entry must point at, and a `retention` entry in the chain records
it. The anchor and the chain live on the same disk as the log, so someone who can
rewrite the file can rewrite the whole chain: record `head` somewhere else (a ticket,
another host) and `verify --expect-head` proves nothing before it changed.

Appends are serialised: within a process by a lock around read-head → insert, and
across processes (API servers sharing one state directory) by a `BEGIN IMMEDIATE`
transaction, so each entry links to the head as it is when the entry is written; the
`seq` primary key rejects any writer that did not take part, and the append retries on a
fresh head a few times before it gives up.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from tartarus.auth.principal import Principal
from tartarus.errors import TartarusError
from tartarus.sqlite_wal import enable_wal

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY,
    ts     REAL NOT NULL,
    tenant TEXT NOT NULL,
    doc    BLOB NOT NULL,
    hash   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit(tenant, seq);
CREATE INDEX IF NOT EXISTS audit_ts ON audit(ts);
CREATE TABLE IF NOT EXISTS audit_anchor (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


class AuditError(TartarusError):
    """The audit log could not be written or read."""


class Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One audit record, exactly as hashed (canonical JSON, sorted keys)."""

    seq: int
    ts: float
    kind: str  # access, admission, key, policy, retention
    action: str
    outcome: str  # allowed, denied, failed, unauthenticated, recorded
    tenant: str
    subject: str
    method: str = ""
    credential: str = ""
    status: int = 0
    resource: dict[str, str] = msgspec.field(default_factory=dict)
    detail: str = ""
    verdicts: list[dict[str, Any]] = msgspec.field(default_factory=list)
    tags: list[str] = msgspec.field(default_factory=list)
    prev: str


class Verification(msgspec.Struct, kw_only=True):
    ok: bool
    entries: int
    first_seq: int | None
    last_seq: int | None
    head: str
    problems: list[str]


_encoder = msgspec.json.Encoder(order="sorted")
_decoder = msgspec.json.Decoder(Entry)
MAX_PROBLEMS = 100
# Attempts at one append whose head moved under it (a writer outside the transaction).
APPEND_ATTEMPTS = 5


def entry_hash(doc: bytes) -> str:
    return hashlib.sha256(doc).hexdigest()


class AuditLog:
    def __init__(
        self,
        path: Path,
        *,
        redact: Callable[[str], str] = lambda s: s,
        tags_for: Callable[[str], list[str]] = lambda tenant: [],
        read_only: bool = False,
    ) -> None:
        self.path = path
        self._redact = redact
        self._tags_for = tags_for
        if read_only:
            if not path.exists():
                raise AuditError(f"no audit log at {path}")
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            enable_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        self._db.execute("PRAGMA busy_timeout=5000")
        # One writer at a time on this connection: appends may come from threads.
        self._write_lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def head(self) -> tuple[int, str]:
        """The last entry's sequence number and hash (the anchor's if the log is empty)."""
        row = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            return int(row[0]), str(row[1])
        return self._anchor()

    def _anchor(self) -> tuple[int, str]:
        row = self._db.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
        return (int(row[0]), str(row[1])) if row is not None else (0, GENESIS)

    def append(
        self,
        *,
        kind: str,
        action: str,
        outcome: str,
        tenant: str,
        subject: str,
        method: str = "",
        credential: str = "",
        status: int = 0,
        resource: dict[str, str] | None = None,
        detail: str = "",
        verdicts: list[dict[str, Any]] | None = None,
        tags: list[str] | None = None,
    ) -> Entry:
        """Appends one entry (secrets redacted from its text) and returns it.

        The head is read and the entry inserted in one `BEGIN IMMEDIATE` transaction
        under the write lock, so concurrent appends (threads, or other processes on the
        same file) each get the next sequence number and link to the entry before."""
        resource = {k: self._redact(v) for k, v in (resource or {}).items()}
        detail = self._redact(detail)
        verdicts = [
            {k: self._redact(v) if isinstance(v, str) else v for k, v in verdict.items()}
            for verdict in verdicts or []
        ]
        tags = sorted({*self._tags_for(tenant), *(tags or [])})
        last: sqlite3.IntegrityError | None = None
        for attempt in range(APPEND_ATTEMPTS):
            if attempt:
                time.sleep(0.005 * attempt)
            with self._write_lock:
                try:
                    # Waits out other processes' writes up to the busy timeout.
                    self._db.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as e:
                    raise AuditError(f"cannot write the audit log {self.path}: {e}") from e
                try:
                    seq, prev = self.head()
                    entry = Entry(
                        seq=seq + 1,
                        ts=time.time(),
                        kind=kind,
                        action=action,
                        outcome=outcome,
                        tenant=tenant,
                        subject=subject,
                        method=method,
                        credential=credential,
                        status=status,
                        resource=resource,
                        detail=detail,
                        verdicts=verdicts,
                        tags=tags,
                        prev=prev,
                    )
                    doc = _encoder.encode(entry)
                    self._db.execute(
                        "INSERT INTO audit (seq, ts, tenant, doc, hash) VALUES (?, ?, ?, ?, ?)",
                        (entry.seq, entry.ts, tenant, doc, entry_hash(doc)),
                    )
                    self._db.execute("COMMIT")
                except sqlite3.IntegrityError as e:
                    # A writer outside the transaction took this sequence number:
                    # re-read the head and link to it.
                    self._rollback()
                    last = e
                    continue
                except sqlite3.Error as e:
                    self._rollback()
                    raise AuditError(f"cannot write the audit log {self.path}: {e}") from e
                except BaseException:
                    self._rollback()
                    raise
                return entry
        raise AuditError(
            f"cannot write the audit log {self.path}: gave up after {APPEND_ATTEMPTS} "
            f"attempts ({last})"
        )

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    def access(
        self,
        principal: Principal | None,
        *,
        action: str,
        outcome: str,
        status: int,
        resource: dict[str, str],
        detail: str = "",
    ) -> None:
        """An API request: a denial, or a change (the access middleware's sink)."""
        self.append(
            kind="access",
            action=action,
            outcome=outcome,
            tenant=principal.tenant if principal else "",
            subject=principal.subject if principal else "",
            method=principal.method.value if principal else "",
            credential=principal.credential if principal else "",
            status=status,
            resource=resource,
            detail=detail,
        )

    def entries(
        self, *, tenant: str | None = None, after_seq: int = 0, limit: int = 100
    ) -> tuple[list[tuple[Entry, str]], int | None]:
        """A page of (entry, hash) in order; returns the page and the next `after_seq`."""
        if tenant is None:
            rows = self._db.execute(
                "SELECT doc, hash FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit + 1),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT doc, hash FROM audit WHERE tenant = ? AND seq > ? ORDER BY seq LIMIT ?",
                (tenant, after_seq, limit + 1),
            ).fetchall()
        page = [(_decoder.decode(doc), str(digest)) for doc, digest in rows[:limit]]
        more = len(rows) > limit
        return page, (page[-1][0].seq if more and page else None)

    def verify(self, expect_head: str | None = None) -> Verification:
        """Walks the whole chain: every hash recomputed, every link and number checked."""
        problems: list[str] = []

        def problem(text: str) -> None:
            if len(problems) < MAX_PROBLEMS:
                problems.append(text)

        anchor_seq, prev = self._anchor()
        expected = anchor_seq + 1
        count = 0
        first: int | None = None
        last: int | None = None
        head = prev
        heads: set[str] = {prev}
        retention_anchors: list[tuple[int, str]] = []
        cursor = self._db.execute("SELECT seq, doc, hash FROM audit ORDER BY seq")
        for seq, raw, stored in cursor:
            count += 1
            # Stored as a BLOB; a hand edit may have turned it into TEXT.
            doc = raw.encode() if isinstance(raw, str) else bytes(raw)
            first = seq if first is None else first
            last = seq
            if entry_hash(doc) != stored:
                problem(f"entry {seq}: its content does not match its hash (altered)")
            try:
                entry = _decoder.decode(doc)
            except msgspec.DecodeError as e:
                problem(f"entry {seq}: not a valid entry ({e})")
                prev, expected = stored, seq + 1
                continue
            if seq != expected:
                problem(f"entry {seq}: expected entry {expected} (entries missing or reordered)")
            if entry.seq != seq:
                problem(f"entry {seq}: says it is entry {entry.seq} (moved)")
            if entry.prev != prev:
                problem(
                    f"entry {seq}: does not follow the entry before it (a previous entry "
                    "was altered, removed or inserted)"
                )
            if entry.kind == "retention" and "anchor_seq" in entry.resource:
                retention_anchors.append(
                    (int(entry.resource["anchor_seq"]), entry.resource["anchor_hash"])
                )
            prev, expected = stored, seq + 1
            head = stored
            heads.add(stored)
        if retention_anchors and retention_anchors[-1] != (anchor_seq, self._anchor()[1]):
            problem("the retention anchor does not match the last retention entry")
        if anchor_seq and not retention_anchors:
            problem(f"the log starts after entry {anchor_seq} but records no retention")
        if expect_head is not None and expect_head not in heads:
            problem(f"the expected head {expect_head} is not in the chain (rewritten?)")
        return Verification(
            ok=not problems,
            entries=count,
            first_seq=first,
            last_seq=last,
            head=head,
            problems=problems,
        )

    def prune(self, before: float, *, subject: str = "system") -> int:
        """Removes entries older than `before` (unix seconds), anchoring the chain."""
        row = self._db.execute(
            "SELECT seq, hash FROM audit WHERE ts < ? ORDER BY seq DESC LIMIT 1", (before,)
        ).fetchone()
        if row is None:
            return 0
        anchor_seq, anchor_hash = int(row[0]), str(row[1])
        with self._write_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("DELETE FROM audit WHERE seq <= ?", (anchor_seq,))
                self._db.execute(
                    "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, ?, ?)"
                    " ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (anchor_seq, anchor_hash),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        removed = cur.rowcount
        self.append(
            kind="retention",
            action="prune",
            outcome="recorded",
            tenant="",
            subject=subject,
            resource={"anchor_seq": str(anchor_seq), "anchor_hash": anchor_hash},
            detail=f"removed {removed} entries older than {before:.0f}",
        )
        return removed
