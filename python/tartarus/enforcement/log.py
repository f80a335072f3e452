"""An append-only log of structured records, on SQLite or on a Redis stream: the error
stream (Cocytus) and the enforcement events (Erinyes) are both one of these.

Records are msgspec Structs with `id` and `ts`; queries filter on equality of string
fields (category, sandbox, node, ...) and return the newest first; `purge` drops what
is older than the retention (SQLite: DELETE; Redis: XTRIM MINID).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import redis.asyncio as aioredis

from tartarus.sqlite_wal import open_db

R = TypeVar("R", bound=msgspec.Struct)

# A query reads at most this many records before filtering (newest first).
SCAN_LIMIT = 10_000


def _with_id(record: R) -> R:
    if getattr(record, "id", ""):
        return record
    return msgspec.structs.replace(record, id=uuid.uuid4().hex[:16])


def _matches(record: Any, filters: dict[str, str]) -> bool:
    return all(getattr(record, k, None) == v for k, v in filters.items() if v)


class SqliteLog(Generic[R]):
    def __init__(self, path: Path, name: str, type_: type[R]) -> None:
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS log_records (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " log TEXT NOT NULL, ts REAL NOT NULL, doc BLOB NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS log_records_ts ON log_records(log, ts)")
        self._name = name
        self._decoder = msgspec.json.Decoder(type_)

    async def append(self, record: R) -> str:
        record = _with_id(record)
        self._db.execute(
            "INSERT INTO log_records (log, ts, doc) VALUES (?, ?, ?)",
            (self._name, getattr(record, "ts", time.time()), msgspec.json.encode(record)),
        )
        return str(getattr(record, "id", ""))

    async def query(
        self, filters: dict[str, str] | None = None, *, since: float = 0.0, limit: int = 100
    ) -> list[R]:
        rows = self._db.execute(
            "SELECT doc FROM log_records WHERE log=? AND ts>=? ORDER BY seq DESC LIMIT ?",
            (self._name, since, SCAN_LIMIT),
        )
        out: list[R] = []
        for (doc,) in rows:
            record = self._decoder.decode(doc)
            if _matches(record, filters or {}):
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    async def purge(self, before: float) -> int:
        cur = self._db.execute("DELETE FROM log_records WHERE log=? AND ts<?", (self._name, before))
        return cur.rowcount

    async def close(self) -> None:
        self._db.close()


class RedisLog(Generic[R]):
    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        type_: type[R],
        *,
        prefix: str = "tartarus:",
        maxlen: int = 100_000,
    ) -> None:
        self._redis = client
        self._key = f"{prefix}log:{name}"
        self._maxlen = maxlen
        self._decoder = msgspec.json.Decoder(type_)

    async def append(self, record: R) -> str:
        record = _with_id(record)
        # Entry ids are Redis's clock in ms, so retention is one XTRIM MINID.
        await self._redis.xadd(
            self._key,
            {"doc": msgspec.json.encode(record)},
            maxlen=self._maxlen,
            approximate=True,
        )
        return str(getattr(record, "id", ""))

    async def query(
        self, filters: dict[str, str] | None = None, *, since: float = 0.0, limit: int = 100
    ) -> list[R]:
        rows = await self._redis.xrevrange(
            self._key, max="+", min=f"{int(since * 1000)}-0", count=SCAN_LIMIT
        )
        out: list[R] = []
        for _, fields in rows or []:
            doc = (fields or {}).get(b"doc")
            if not doc:
                continue
            record = self._decoder.decode(doc)
            if _matches(record, filters or {}):
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    async def purge(self, before: float) -> int:
        return int(await self._redis.xtrim(self._key, minid=f"{int(before * 1000)}-0"))

    async def close(self) -> None:
        """The client is shared and closed by its owner."""
