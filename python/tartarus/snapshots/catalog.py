"""Snapshot records and warm-pool sizes, kept in the server's state database.

The tables live beside the sandbox records (same SQLite file, WAL) under their own
names, with their own schema version, so the snapshot catalog evolves without touching
the sandbox store's migrations. A snapshot's files are blobs in the blob store
(Erebus); a record names them by digest.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Literal

import msgspec

from tartarus.api.snapshots import SnapshotPurpose
from tartarus.errors import TartarusError
from tartarus.runtime.types import Backend, Resources, TrustLevel
from tartarus.sqlite_wal import open_db

# With the names that live in `tartarus.api.snapshots` (a leaf the SDK loads), re-exported here.
__all__ = [
    "SCHEMA_VERSION",
    "CatalogError",
    "PoolTarget",
    "SnapshotCatalog",
    "SnapshotPurpose",
    "SnapshotRecord",
    "new_snapshot_id",
]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nyx_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nyx_snapshots (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL UNIQUE,
    template   TEXT NOT NULL,
    backend    TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc        BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS nyx_snapshots_template ON nyx_snapshots(template, purpose, seq);
CREATE TABLE IF NOT EXISTS nyx_pools (
    template TEXT PRIMARY KEY,
    doc      BLOB NOT NULL
);
"""


class CatalogError(TartarusError):
    pass


class SnapshotRecord(msgspec.Struct, kw_only=True):
    """One snapshot: where its files are (blob digests) and what it restores into."""

    id: str
    backend: Backend
    template: str
    purpose: SnapshotPurpose
    created_at: float
    size_bytes: int
    # The snapshot's files: one blob, a file (microVM) or a directory tree (gVisor).
    blob: str
    blob_kind: Literal["file", "tree"]
    # An incremental snapshot applies on top of its parent's files.
    parent: str | None = None
    parent_blob: str | None = None
    source_sandbox: str | None = None
    label: str = ""
    resources: Resources = msgspec.field(default_factory=Resources)
    network: bool = False
    trust: TrustLevel = TrustLevel.UNTRUSTED
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    # The guest memory's checksum was checked once (restores may skip reading it all).
    verified: bool = False
    # Whose it is: the source sandbox's tenant, or "*" (every tenant) for a template's.
    tenant: str = "default"
    seq: int = 0

    @property
    def owner(self) -> str:
        """The blob store owner holding this snapshot's references."""
        return f"snapshot:{self.id}"


class PoolTarget(msgspec.Struct, kw_only=True, frozen=True):
    """How many ready sandboxes to keep for a template (set through the API)."""

    template: str
    size: int
    backend: Backend = Backend.AUTO
    updated_at: float = 0.0


def new_snapshot_id() -> str:
    return "snap-" + secrets.token_hex(8)


class SnapshotCatalog:
    """Snapshot records and pool targets in SQLite at `path` (the server's state DB)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_db(path)
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM nyx_meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO nyx_meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        elif int(row[0]) > SCHEMA_VERSION:
            raise CatalogError(
                f"{path} holds snapshot records of schema {row[0]}, newer than this tartarus "
                f"({SCHEMA_VERSION}); upgrade tartarus or use another state_dir"
            )
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(SnapshotRecord)
        self._pool_decoder = msgspec.json.Decoder(PoolTarget)

    def close(self) -> None:
        self._db.close()

    # --- snapshots ---------------------------------------------------------------------

    def insert(self, record: SnapshotRecord) -> SnapshotRecord:
        cur = self._db.execute(
            "INSERT INTO nyx_snapshots (id, template, backend, purpose, created_at, doc)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.template,
                record.backend.value,
                record.purpose.value,
                record.created_at,
                self._encoder.encode(record),
            ),
        )
        record.seq = int(cur.lastrowid or 0)
        return record

    def save(self, record: SnapshotRecord) -> None:
        self._db.execute(
            "UPDATE nyx_snapshots SET doc=? WHERE id=?", (self._encoder.encode(record), record.id)
        )

    def repurpose(self, record: SnapshotRecord, purpose: SnapshotPurpose, label: str) -> None:
        """Files `record` under another purpose (a paused sandbox's snapshot kept as its
        checkpoint on stop)."""
        record.purpose = purpose
        record.label = label
        self._db.execute(
            "UPDATE nyx_snapshots SET purpose=?, doc=? WHERE id=?",
            (purpose.value, self._encoder.encode(record), record.id),
        )

    def _decode(self, seq: int, doc: bytes) -> SnapshotRecord:
        record = self._decoder.decode(doc)
        record.seq = seq
        return record

    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        row = self._db.execute(
            "SELECT seq, doc FROM nyx_snapshots WHERE id=?", (snapshot_id,)
        ).fetchone()
        return None if row is None else self._decode(row[0], row[1])

    def remove(self, snapshot_id: str) -> bool:
        cur = self._db.execute("DELETE FROM nyx_snapshots WHERE id=?", (snapshot_id,))
        return cur.rowcount > 0

    def records(
        self,
        *,
        template: str | None = None,
        purposes: tuple[SnapshotPurpose, ...] = (),
        tenants: tuple[str, ...] | None = None,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[SnapshotRecord]:
        """Records in creation order after `after_seq` (of `tenants` only, if given)."""
        where = ["seq > ?"]
        args: list[object] = [after_seq]
        if tenants is not None:
            where.append(f"json_extract(doc, '$.tenant') IN ({','.join('?' * len(tenants))})")
            args.extend(tenants)
        if template is not None:
            where.append("template = ?")
            args.append(template)
        if purposes:
            where.append(f"purpose IN ({','.join('?' * len(purposes))})")
            args.extend(p.value for p in purposes)
        args.append(limit)
        rows = self._db.execute(
            f"SELECT seq, doc FROM nyx_snapshots WHERE {' AND '.join(where)}"  # noqa: S608
            " ORDER BY seq LIMIT ?",
            args,
        ).fetchall()
        return [self._decode(seq, doc) for seq, doc in rows]

    def children(self, snapshot_id: str) -> list[SnapshotRecord]:
        """Snapshots that apply on top of `snapshot_id`."""
        rows = self._db.execute(
            "SELECT seq, doc FROM nyx_snapshots WHERE json_extract(doc, '$.parent') = ?",
            (snapshot_id,),
        ).fetchall()
        return [self._decode(seq, doc) for seq, doc in rows]

    def latest(self, template: str, purpose: SnapshotPurpose) -> SnapshotRecord | None:
        row = self._db.execute(
            "SELECT seq, doc FROM nyx_snapshots WHERE template=? AND purpose=?"
            " ORDER BY seq DESC LIMIT 1",
            (template, purpose.value),
        ).fetchone()
        return None if row is None else self._decode(row[0], row[1])

    # --- pool targets -------------------------------------------------------------------

    def set_pool(self, target: PoolTarget) -> PoolTarget:
        target = msgspec.structs.replace(target, updated_at=time.time())
        self._db.execute(
            "INSERT INTO nyx_pools (template, doc) VALUES (?, ?)"
            " ON CONFLICT(template) DO UPDATE SET doc=excluded.doc",
            (target.template, self._encoder.encode(target)),
        )
        return target

    def pools(self) -> list[PoolTarget]:
        rows = self._db.execute("SELECT doc FROM nyx_pools ORDER BY template").fetchall()
        return [self._pool_decoder.decode(doc) for (doc,) in rows]
