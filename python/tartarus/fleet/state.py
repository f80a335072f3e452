"""Opens the fleet's shared state from a URL: `redis://…` (many API servers) or
`sqlite:///path/fleet.db` (one API server with remote node agents)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from tartarus.enforcement.log import RedisLog, SqliteLog
from tartarus.enforcement.records import EnforcementEvent, ErrorRecord
from tartarus.errors import ConfigError
from tartarus.fleet.book import RedisBook, SandboxBook, SqliteBook
from tartarus.fleet.quota import FleetQuota, RedisQuota, SqliteQuota
from tartarus.queue import QueueSettings, WorkQueue
from tartarus.queue.redis_streams import RedisQueue
from tartarus.queue.sqlite import SqliteQueue
from tartarus.scheduling.registry import Registry, SqliteRegistry
from tartarus.scheduling.registry_redis import RedisRegistry

LANES_QUEUE = "lanes"

# A command that meets a dropped connection (Redis restarted: every pooled connection
# is dead) reconnects and is sent again, for up to about three seconds; a transaction
# watching keys is not resent (its loop starts again). Longer outages are a 503.
_RETRY = Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 8)
# What the client retries, and what is an outage when retrying did not help.
_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def is_outage(exc: BaseException) -> bool:
    """The shared state cannot be reached now (Redis down, restarting or loading)."""
    return isinstance(exc, _OUTAGES)


def inbox_name(node_id: str) -> str:
    return f"inbox:{node_id}"


@dataclass
class FleetState:
    kind: str
    lanes: WorkQueue
    registry: Registry
    book: SandboxBook
    quota: FleetQuota
    errors: RedisLog[ErrorRecord] | SqliteLog[ErrorRecord]
    events: RedisLog[EnforcementEvent] | SqliteLog[EnforcementEvent]
    inbox_settings: QueueSettings
    redis: aioredis.Redis | None = None
    path: Path | None = None
    _inboxes: dict[str, WorkQueue] = field(default_factory=dict)

    def inbox(self, node_id: str) -> WorkQueue:
        queue = self._inboxes.get(node_id)
        if queue is None:
            if self.redis is not None:
                queue = RedisQueue(self.redis, inbox_name(node_id), self.inbox_settings)
            else:
                assert self.path is not None
                queue = SqliteQueue(self.path, inbox_name(node_id), self.inbox_settings)
            self._inboxes[node_id] = queue
        return queue

    async def ping(self) -> None:
        await self.book.ping()


def describe(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


@asynccontextmanager
async def open_state(
    url: str,
    *,
    lanes: QueueSettings,
    inbox: QueueSettings,
    heartbeat_ttl_s: float,
) -> AsyncIterator[FleetState]:
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss", "unix"):
        client = aioredis.Redis.from_url(
            url, health_check_interval=10, retry=_RETRY, retry_on_error=list(_OUTAGES)
        )
        state = FleetState(
            kind="redis",
            lanes=RedisQueue(client, LANES_QUEUE, lanes),
            registry=RedisRegistry(client, ttl_s=heartbeat_ttl_s),
            book=RedisBook(client),
            quota=RedisQuota(client),
            errors=RedisLog(client, "errors", ErrorRecord),
            events=RedisLog(client, "events", EnforcementEvent),
            inbox_settings=inbox,
            redis=client,
        )
        try:
            yield state
        finally:
            await client.aclose()
        return
    if parts.scheme == "sqlite":
        path = Path(parts.path)
        sqlite_state = FleetState(
            kind="sqlite",
            lanes=SqliteQueue(path, LANES_QUEUE, lanes),
            registry=SqliteRegistry(path, ttl_s=heartbeat_ttl_s),
            book=SqliteBook(path),
            quota=SqliteQuota(path),
            errors=SqliteLog(path, "errors", ErrorRecord),
            events=SqliteLog(path, "events", EnforcementEvent),
            inbox_settings=inbox,
            path=path,
        )
        try:
            yield sqlite_state
        finally:
            for closeable in (
                sqlite_state.lanes,
                sqlite_state.registry,
                sqlite_state.book,
                sqlite_state.quota,
                sqlite_state.errors,
                sqlite_state.events,
                *sqlite_state._inboxes.values(),
            ):
                await closeable.close()
        return
    raise ConfigError(
        f"--state {describe(url)!r}: use redis://HOST:PORT/DB (many API servers) or "
        "sqlite:///PATH (one API server)"
    )
