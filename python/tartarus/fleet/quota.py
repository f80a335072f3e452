"""Minos across the fleet: every API server holds tenants' quota shares in the shared
state, so a quota holds however many API servers admit at once.

A hold is keyed by the sandbox id the API server chose before admission; it lasts until
the fleet's record of that sandbox ends (the coordinator releases it on every path that
ends one) or, should a server die between admitting and recording, until the sweep
finds a hold whose record is missing or ended. The check and the hold are one atomic
step: Redis WATCH/MULTI on the tenant's hash (retried on a conflict), SQLite
BEGIN IMMEDIATE. Both use Minos's own arithmetic (`tartarus.policy.quotas.over_quota`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from tartarus.policy.documents import Quotas
from tartarus.policy.quotas import Usage, over_quota
from tartarus.queue.sqlite import immediate
from tartarus.sqlite_wal import open_db


class Held(msgspec.Struct, frozen=True, kw_only=True):
    usage: Usage
    since: float


class FleetQuota(Protocol):
    async def hold(self, tenant: str, sandbox_id: str, want: Usage, quotas: Quotas) -> str | None:
        """Holds `want` for the sandbox, or returns why the tenant's quota refuses it."""
        ...

    async def release(self, tenant: str, sandbox_id: str) -> None: ...

    async def holds(self) -> dict[str, dict[str, Held]]:
        """tenant → sandbox id → its hold (for the sweep and for tests)."""
        ...

    async def close(self) -> None: ...


_held = msgspec.json.Decoder(Held)
_encode = msgspec.json.Encoder().encode


def _refusal(quotas: Quotas, tenant: str, held: list[Held], want: Usage) -> str | None:
    return over_quota(quotas, tenant, [h.usage for h in held], want)


class RedisQuota:
    """Hash `quota:TENANT` (sandbox id → hold) and the set `quota-tenants`."""

    def __init__(self, client: aioredis.Redis, prefix: str = "tartarus:") -> None:
        self._redis = client
        self._p = prefix

    def _key(self, tenant: str) -> str:
        return f"{self._p}quota:{tenant}"

    async def hold(self, tenant: str, sandbox_id: str, want: Usage, quotas: Quotas) -> str | None:
        key = self._key(tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raws = await pipe.hvals(key)
                    refusal = _refusal(quotas, tenant, [_held.decode(r) for r in raws], want)
                    if refusal is not None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return refusal
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.hset(key, sandbox_id, _encode(Held(usage=want, since=time.time())))
                    pipe.sadd(f"{self._p}quota-tenants", tenant)
                    await pipe.execute()
                except WatchError:
                    continue  # another server changed the tenant's holds: count again
                return None

    async def release(self, tenant: str, sandbox_id: str) -> None:
        await self._redis.hdel(self._key(tenant), sandbox_id)

    async def holds(self) -> dict[str, dict[str, Held]]:
        found: dict[str, dict[str, Held]] = {}
        for raw_tenant in await self._redis.smembers(f"{self._p}quota-tenants"):
            tenant = raw_tenant.decode() if isinstance(raw_tenant, bytes) else str(raw_tenant)
            entries = await self._redis.hgetall(self._key(tenant))
            if not entries:
                await self._redis.srem(f"{self._p}quota-tenants", tenant)
                continue
            found[tenant] = {
                (k.decode() if isinstance(k, bytes) else str(k)): _held.decode(v)
                for k, v in entries.items()
            }
        return found

    async def close(self) -> None:
        pass


class SqliteQuota:
    """Table `quota_holds` in the fleet's database (one API server)."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS quota_holds (tenant TEXT NOT NULL, "
            "sandbox_id TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (tenant, sandbox_id))"
        )

    async def hold(self, tenant: str, sandbox_id: str, want: Usage, quotas: Quotas) -> str | None:
        with immediate(self._db):
            rows = self._db.execute(
                "SELECT doc FROM quota_holds WHERE tenant=?", (tenant,)
            ).fetchall()
            refusal = _refusal(quotas, tenant, [_held.decode(r[0]) for r in rows], want)
            if refusal is None:
                self._db.execute(
                    "INSERT OR REPLACE INTO quota_holds (tenant, sandbox_id, doc) VALUES (?, ?, ?)",
                    (tenant, sandbox_id, _encode(Held(usage=want, since=time.time()))),
                )
        return refusal

    async def release(self, tenant: str, sandbox_id: str) -> None:
        self._db.execute(
            "DELETE FROM quota_holds WHERE tenant=? AND sandbox_id=?", (tenant, sandbox_id)
        )

    async def holds(self) -> dict[str, dict[str, Held]]:
        found: dict[str, dict[str, Held]] = {}
        for tenant, sandbox_id, doc in self._db.execute(
            "SELECT tenant, sandbox_id, doc FROM quota_holds"
        ):
            found.setdefault(tenant, {})[sandbox_id] = _held.decode(doc)
        return found

    async def close(self) -> None:
        self._db.close()
