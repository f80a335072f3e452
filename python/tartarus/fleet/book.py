"""The fleet's sandbox records, shared by every API server: SQLite (one API server) or
Redis (many). The same `SandboxRecord` the single-host server keeps, plus its node.

Writes go through `update(id, change)`, a read-modify-write that is atomic (SQLite:
BEGIN IMMEDIATE; Redis: WATCH/MULTI, retried on a conflict), so a node's report and the
reaper failing that node cannot overwrite each other. Changes are announced (`notify`;
Redis pub/sub across servers) so a create waiting for its sandbox wakes at once.

An idempotency key is claimed for one sandbox id under a lease that its create renews
while it admits; inserting the record binds the key, in the same transaction, and only if
the claim is still the create's. A server that dies between claiming and inserting
leaves a claim whose lease runs out: a retry of the create takes it over (on Redis, from
any server) instead of waiting for the key's day-long retention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from tartarus.errors import UnavailableError
from tartarus.node.store import ListFilter, SandboxRecord, Store
from tartarus.queue.sqlite import immediate

Change = Callable[[SandboxRecord], SandboxRecord | None]

# Idempotency keys and ended records are kept this long.
RETENTION_S = 24 * 3600.0
# A create holds its key's claim this long past its last renewal, and renews it this
# often while it admits the sandbox.
CLAIM_LEASE_S = 10.0
CLAIM_RENEW_S = 3.0


class KeyClaim(msgspec.Struct, array_like=True, frozen=True):
    """Who holds an idempotency key: the create's fingerprint, its sandbox id, and until
    when its claim holds (0 once the record is inserted: bound for good)."""

    fingerprint: str
    sandbox_id: str | None
    lease_until: float = 0.0

    @property
    def bound(self) -> bool:
        return self.lease_until == 0.0

    def lapsed(self, now: float) -> bool:
        return not self.bound and self.lease_until < now


class _Keep:
    """What a change of a claim returns to leave it as it is."""


KEEP = _Keep()


class ClaimLostError(UnavailableError):
    """The create took longer than its claim's lease and a retry took the key over."""

    slug = "idempotency-claim-lost"

    def __init__(self, key: str) -> None:
        super().__init__(f"the claim of idempotency key {key!r} was taken over", retry_after=1)


# A waiter looks at the record this often even without a notification (pub/sub is
# at-most-once).
RECHECK_S = 0.5


class SandboxBook(Protocol):
    async def insert(self, record: SandboxRecord, *, key: str | None = None) -> SandboxRecord:
        """Inserts the record; with `key`, binds that idempotency key to it in the same
        step, or raises ClaimLostError if the key is no longer claimed for it."""
        ...

    async def get(self, sandbox_id: str) -> SandboxRecord | None: ...

    async def update(self, sandbox_id: str, change: Change) -> SandboxRecord | None:
        """Applies `change` to the current record atomically; `change` returns the new
        record, or None to leave it as it is. Returns what is stored afterwards."""
        ...

    async def page(
        self, flt: ListFilter, *, after_seq: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]: ...

    async def on_node(self, node_id: str) -> list[SandboxRecord]:
        """Live records placed on the node."""
        ...

    async def claim_key(
        self, key: str, fingerprint: str, sandbox_id: str
    ) -> tuple[bool, KeyClaim | None]:
        """Claims `key` for the create of `sandbox_id`: (True, None) when it was free,
        (True, earlier) when it took over the lapsed claim of a create that died, and
        (False, earlier) when another create holds it or made its sandbox."""
        ...

    async def renew_key(self, key: str, sandbox_id: str) -> None:
        """Extends the claim's lease while its create still admits."""
        ...

    async def release_key(self, key: str, sandbox_id: str) -> None:
        """Drops the claim of a create that failed, if it is still that create's and not
        bound."""
        ...

    async def purge(self, before: float) -> int: ...

    async def ping(self) -> None: ...

    async def wait(self, sandbox_id: str, timeout_s: float) -> None:
        """Returns when the record may have changed, or after `timeout_s`."""
        ...

    async def close(self) -> None: ...


class Waiters:
    """In-process wake-ups for `wait`, keyed by sandbox id."""

    def __init__(self) -> None:
        self._events: dict[str, anyio.Event] = {}

    def wake(self, sandbox_id: str) -> None:
        event = self._events.pop(sandbox_id, None)
        if event is not None:
            event.set()

    async def wait(self, sandbox_id: str, timeout_s: float) -> None:
        event = self._events.setdefault(sandbox_id, anyio.Event())
        with anyio.move_on_after(min(timeout_s, RECHECK_S)):
            await event.wait()


class SqliteBook:
    """The server's own SQLite store (same schema and migrations), for one API server."""

    def __init__(self, path: Path) -> None:
        self._store = Store(path)
        self._waiters = Waiters()
        # Keys whose create runs in this process, by key: the one API server's, so an
        # unbound claim not here is one a dead process left.
        self._creating: dict[str, str] = {}

    async def insert(self, record: SandboxRecord, *, key: str | None = None) -> SandboxRecord:
        if key is not None and self._creating.get(key) != record.id:
            raise ClaimLostError(key)
        with immediate(self._store._db):
            inserted = self._store.insert(record)
            if key is not None:
                self._store.bind_key(key, record.id)
                del self._creating[key]
        self._waiters.wake(record.id)
        return inserted

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        return self._store.get(sandbox_id)

    async def update(self, sandbox_id: str, change: Change) -> SandboxRecord | None:
        with immediate(self._store._db):
            current = self._store.get(sandbox_id)
            if current is None:
                return None
            updated = change(current)
            if updated is None:
                return current
            self._store.save(updated)
        self._waiters.wake(sandbox_id)
        return updated

    async def page(
        self, flt: ListFilter, *, after_seq: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        return self._store.list(flt, after_seq=after_seq, limit=limit)

    async def on_node(self, node_id: str) -> list[SandboxRecord]:
        return [r for r in self._store.live() if r.node == node_id]

    async def claim_key(
        self, key: str, fingerprint: str, sandbox_id: str
    ) -> tuple[bool, KeyClaim | None]:
        earlier = self._store.claim_key(key, fingerprint)
        if earlier is None:
            self._creating[key] = sandbox_id
            return True, None
        held = self._creating.get(key)
        claim = KeyClaim(earlier[0], earlier[1] or held, 0.0 if earlier[1] else time.time())
        if earlier[1] is None and held is None:
            # Unbound and no create of ours holds it: the server that claimed it died.
            self._store.release_key(key)
            self._store.claim_key(key, fingerprint)
            self._creating[key] = sandbox_id
            return True, claim
        return False, claim

    async def renew_key(self, key: str, sandbox_id: str) -> None:
        """A claim lives as long as this process holds it."""

    async def release_key(self, key: str, sandbox_id: str) -> None:
        if self._creating.get(key) == sandbox_id:
            del self._creating[key]
            self._store.release_key(key)

    async def purge(self, before: float) -> int:
        return self._store.purge_ended(before)

    async def ping(self) -> None:
        self._store.ping()

    async def wait(self, sandbox_id: str, timeout_s: float) -> None:
        await self._waiters.wait(sandbox_id, timeout_s)

    async def close(self) -> None:
        self._store.close()


class RedisBook:
    """Keys: `sb:ID` (the record, JSON), `sb-seq` (counter), `sb-all` (sorted set of ids by
    seq: listing order and cursors), `sb-node:NODE` (live ids per node), `idem:KEY`
    (a KeyClaim, expiring), channel `sb-changed` (ids)."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "tartarus:") -> None:
        self._redis = client
        self._p = prefix
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(SandboxRecord)
        self._waiters = Waiters()
        self.channel = f"{prefix}sb-changed"

    def _key(self, sandbox_id: str) -> str:
        return f"{self._p}sb:{sandbox_id}"

    def _claim_name(self, key: str) -> str:
        return f"{self._p}idem:{key}"

    async def insert(self, record: SandboxRecord, *, key: str | None = None) -> SandboxRecord:
        record.seq = int(await self._redis.incr(f"{self._p}sb-seq"))

        def add(pipe: aioredis.client.Pipeline) -> None:
            pipe.set(self._key(record.id), self._encoder.encode(record))
            pipe.zadd(f"{self._p}sb-all", {record.id: record.seq})
            pipe.publish(self.channel, record.id)

        if key is None:
            async with self._redis.pipeline(transaction=True) as pipe:
                add(pipe)
                await pipe.execute()
            return record

        def bind(claim: KeyClaim | None) -> KeyClaim | _Keep:
            if claim is not None and claim.bound and claim.sandbox_id == record.id:
                return KEEP  # our own EXEC went through and its reply was lost
            if claim is None or claim.bound or claim.sandbox_id != record.id:
                raise ClaimLostError(key)
            return KeyClaim(claim.fingerprint, record.id, 0.0)

        await self._on_claim(key, bind, also=add)
        return record

    async def get(self, sandbox_id: str) -> SandboxRecord | None:
        raw = await self._redis.get(self._key(sandbox_id))
        return None if raw is None else self._decoder.decode(raw)

    async def update(self, sandbox_id: str, change: Change) -> SandboxRecord | None:
        key = self._key(sandbox_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return None
                    current = self._decoder.decode(raw)
                    updated = change(self._decoder.decode(raw))
                    if updated is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return current
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(key, self._encoder.encode(updated))
                    self._index(pipe, current, updated)
                    pipe.publish(self.channel, sandbox_id)
                    await pipe.execute()
                except WatchError:
                    continue
                return updated

    def _index(
        self, pipe: aioredis.client.Pipeline, old: SandboxRecord, new: SandboxRecord
    ) -> None:
        if old.node and (old.node != new.node or not new.live):
            pipe.srem(f"{self._p}sb-node:{old.node}", new.id)
        if new.node and new.live:
            pipe.sadd(f"{self._p}sb-node:{new.node}", new.id)

    async def _records(self, ids: list[str]) -> list[SandboxRecord]:
        if not ids:
            return []
        raws = await self._redis.mget([self._key(i) for i in ids])
        return [self._decoder.decode(raw) for raw in raws if raw is not None]

    async def page(
        self, flt: ListFilter, *, after_seq: int, limit: int
    ) -> tuple[list[SandboxRecord], int | None]:
        page: list[SandboxRecord] = []
        start = after_seq
        while len(page) <= limit:
            ids = await self._redis.zrangebyscore(
                f"{self._p}sb-all", f"({start}", "+inf", start=0, num=max(limit * 2, 64)
            )
            if not ids:
                break
            batch = await self._records([_text(i) for i in ids])
            for record in batch:
                start = max(start, record.seq)
                if _matches(record, flt):
                    page.append(record)
                    if len(page) > limit:
                        break
            if len(batch) == 0:
                break
        more = len(page) > limit
        page = page[:limit]
        return page, (page[-1].seq if more and page else None)

    async def on_node(self, node_id: str) -> list[SandboxRecord]:
        ids = await self._redis.smembers(f"{self._p}sb-node:{node_id}")
        records = await self._records(sorted(_text(i) for i in ids))
        return [r for r in records if r.live and r.node == node_id]

    async def _on_claim(
        self,
        key: str,
        change: Callable[[KeyClaim | None], KeyClaim | _Keep | None],
        *,
        also: Callable[[aioredis.client.Pipeline], None] | None = None,
    ) -> KeyClaim | None:
        """Applies `change` to the key's claim atomically (WATCH/MULTI, again after a
        conflict): it returns the new claim, None to delete it, or KEEP to leave it (an
        exception it raises ends the call). `also` adds commands to the same transaction
        unless the claim is kept. Returns the claim as it was."""
        name = self._claim_name(key)
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(name)
                    claim = decode_claim(await pipe.get(name))
                    new = change(claim)
                    if isinstance(new, _Keep):
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return claim
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if new is None:
                        pipe.delete(name)
                    else:
                        pipe.set(name, self._encoder.encode(new), ex=int(RETENTION_S))
                    if also is not None:
                        also(pipe)
                    await pipe.execute()
                except WatchError:
                    continue
                return claim

    async def claim_key(
        self, key: str, fingerprint: str, sandbox_id: str
    ) -> tuple[bool, KeyClaim | None]:
        now = await self._now()
        mine = KeyClaim(fingerprint, sandbox_id, now + CLAIM_LEASE_S)

        def claim(c: KeyClaim | None) -> KeyClaim | _Keep:
            if c is not None and c.sandbox_id == sandbox_id:
                return KEEP  # ours already (a resent EXEC whose reply was lost)
            return KEEP if c is not None and not c.lapsed(now) else mine

        earlier = await self._on_claim(key, claim)
        if earlier is not None and earlier.sandbox_id == sandbox_id:
            return True, None
        return earlier is None or earlier.lapsed(now), earlier

    async def _now(self) -> float:
        """Redis's clock: leases compare times written by different API servers."""
        seconds, micros = await self._redis.time()
        return float(seconds) + micros / 1e6

    async def _change_claim(
        self, key: str, sandbox_id: str, change: Callable[[KeyClaim], KeyClaim | None]
    ) -> None:
        """Replaces (or, for None, deletes) the claim if it is still the unbound claim
        of `sandbox_id`'s create."""
        await self._on_claim(
            key,
            lambda c: KEEP if c is None or c.bound or c.sandbox_id != sandbox_id else change(c),
        )

    async def renew_key(self, key: str, sandbox_id: str) -> None:
        until = await self._now() + CLAIM_LEASE_S
        await self._change_claim(
            key, sandbox_id, lambda c: msgspec.structs.replace(c, lease_until=until)
        )

    async def release_key(self, key: str, sandbox_id: str) -> None:
        await self._change_claim(key, sandbox_id, lambda c: None)

    async def purge(self, before: float) -> int:
        ids = await self._redis.zrange(f"{self._p}sb-all", 0, -1)
        gone = [
            r.id
            for r in await self._records([_text(i) for i in ids])
            if r.ended_at is not None and r.ended_at < before
        ]
        if gone:
            await self._redis.zrem(f"{self._p}sb-all", *gone)
            await self._redis.delete(*(self._key(i) for i in gone))
        return len(gone)

    async def ping(self) -> None:
        await self._redis.ping()

    async def wait(self, sandbox_id: str, timeout_s: float) -> None:
        await self._waiters.wait(sandbox_id, timeout_s)

    async def listen(self) -> None:
        """Wakes local waiters on every change any API server announces; runs until
        cancelled."""
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self.channel)
        try:
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._waiters.wake(_text(message["data"]))
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        """The client is shared and closed by its owner."""


_claims = msgspec.json.Decoder(KeyClaim)


def decode_claim(raw: bytes | str | None) -> KeyClaim | None:
    """Keys claimed before leases were `[fingerprint, sandbox id or null]`: bound (lease
    0) when they have a sandbox, else a claim whose server is long gone (lapsed)."""
    if raw is None:
        return None
    claim = _claims.decode(raw)
    if claim.sandbox_id is None and claim.bound:
        return msgspec.structs.replace(claim, lease_until=1.0)
    return claim


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _matches(record: SandboxRecord, flt: ListFilter) -> bool:
    if flt.states and record.state not in flt.states:
        return False
    if flt.template is not None and record.template != flt.template:
        return False
    if flt.backend is not None and record.backend != flt.backend:
        return False
    return all(record.metadata.get(k) == v for k, v in flt.metadata)
