"""The queue on Redis Streams: one stream per lane, one consumer group, a dead-letter stream.

- `put`: XADD, refused when the lane's stream already holds `max_depth` entries
  (acknowledged entries are deleted, so the length is waiting plus in flight); the check
  and the add are one Lua script, so concurrent producers cannot overshoot.
- `get`: one Lua script walks the lanes in priority order; in each it first takes back
  the oldest message whose visibility timeout passed (XAUTOCLAIM, which counts the
  delivery; over the limit it goes to the dead-letter stream with the reason), then a
  new one (XREADGROUP `>`). When every lane is empty the caller blocks in XREAD on the
  lanes' last ids, so it wakes on the next XADD without taking anything.
- `ack`: XACK + XDEL. `retry`: XCLAIM with IDLE set past the timeout (JUSTID: not a
  delivery), so the next `get` takes it back. `extend`: XCLAIM JUSTID resets the idle time.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

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

GROUP = "acheron"
DEAD_LETTER_MAXLEN = 100_000
# A blocked consumer looks again at least this often: for messages made visible by a
# retry or an expired visibility timeout (neither adds to the stream, so XREAD sleeps).
MAX_BLOCK_S = 1.0

_PUT = """
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {0, depth} end
return {1, redis.call('XADD', KEYS[1], '*', 'body', ARGV[2], 'at', ARGV[3])}
"""

# KEYS: the lane streams in priority order, then the dead-letter stream.
# ARGV: group, consumer, min idle ms, max deliveries, queue name, reason suffix, lane names...
_TAKE = """
local group, consumer = ARGV[1], ARGV[2]
local min_idle, max_deliveries = tonumber(ARGV[3]), tonumber(ARGV[4])
local lanes = #KEYS - 1
local dead = KEYS[#KEYS]
for i = 1, lanes do
  local key = KEYS[i]
  local cursor = '0-0'
  repeat
    local res = redis.call('XAUTOCLAIM', key, group, consumer, min_idle, cursor, 'COUNT', 1)
    cursor = res[1]
    for _, gone in ipairs(res[3] or {}) do redis.call('XACK', key, group, gone) end
    for _, entry in ipairs(res[2]) do
      local id, fields = entry[1], entry[2]
      local count = redis.call('XPENDING', key, group, id, id, 1)[1][4]
      if count > max_deliveries then
        local t = redis.call('TIME')
        local body, at = '', '0'
        for f = 1, #fields, 2 do
          if fields[f] == 'body' then body = fields[f + 1] end
          if fields[f] == 'at' then at = fields[f + 1] end
        end
        redis.call('XADD', dead, 'MAXLEN', '~', ARGV[7 + lanes], '*',
          'id', id, 'queue', ARGV[5], 'lane', ARGV[6 + i], 'body', body, 'at', at,
          'reason', 'delivered ' .. (count - 1) .. ARGV[6],
          'deliveries', count - 1, 'failed_at', t[1] .. '.' .. string.format('%06d', t[2]))
        redis.call('XACK', key, group, id)
        redis.call('XDEL', key, id)
      else
        return {i, id, fields, count}
      end
    end
  until cursor == '0-0'
  local new = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', key, '>')
  if new then
    local entry = new[1][2][1]
    return {i, entry[1], entry[2], 1}
  end
end
local last = {}
for i = 1, lanes do
  local top = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  last[i] = top[1] and top[1][1] or '0-0'
end
return {0, last}
"""

# KEYS: lane stream, dead stream. ARGV: group, id, queue, lane, body, at, reason, deliveries.
_BURY = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local t = redis.call('TIME')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'id', ARGV[2], 'queue', ARGV[3],
  'lane', ARGV[4], 'body', ARGV[5], 'at', ARGV[6], 'reason', ARGV[7], 'deliveries', ARGV[8],
  'failed_at', t[1] .. '.' .. string.format('%06d', t[2]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
"""


def _fields(raw: list[Any]) -> dict[bytes, bytes]:
    return {raw[i]: raw[i + 1] for i in range(0, len(raw), 2)}


class RedisQueue:
    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        settings: QueueSettings | None = None,
        *,
        prefix: str = "tartarus:",
    ) -> None:
        self._redis = client
        self._name = name
        self._settings = settings or QueueSettings()
        # The braces keep one queue's keys in one cluster slot (Lua touches all of them).
        base = f"{prefix}{{q:{name}}}"
        self._keys = {lane: f"{base}:{lane.value}" for lane in LANES}
        self._dead = f"{base}:dead"
        self._put = client.register_script(_PUT)
        self._take_script = client.register_script(_TAKE)
        self._bury_script = client.register_script(_BURY)
        self._ready = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> QueueSettings:
        return self._settings

    @property
    def _visibility_ms(self) -> int:
        return max(1, int(self._settings.visibility_timeout_s * 1000))

    async def _ensure_groups(self) -> None:
        if self._ready:
            return
        for key in self._keys.values():
            try:
                await self._redis.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._ready = True

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except ResponseError as e:
            if "NOGROUP" in str(e):
                # Another API server drained (deleted) this queue; make it again.
                self._ready = False
            raise QueueError(f"queue {self._name!r}: Redis failed: {e}") from e
        except RedisError as e:
            raise QueueError(f"queue {self._name!r}: Redis failed: {e}") from e

    async def put(self, body: bytes, lane: Lane = Lane.MAIN) -> str:
        await self._ensure_groups()
        ok, value = await self._call(
            self._put(
                keys=[self._keys[lane]],
                args=[self._settings.max_depth, body, repr(time.time())],
            )
        )
        if not ok:
            raise QueueFullError(self._name, lane, int(value), self._settings.max_depth)
        return str(value.decode())

    async def _take(self, consumer: str) -> Message | list[bytes]:
        reason_suffix = poison_reason(0, self._settings).removeprefix("delivered 0")
        result = await self._call(
            self._take_script(
                keys=[*self._keys.values(), self._dead],
                args=[
                    GROUP,
                    consumer,
                    self._visibility_ms,
                    self._settings.max_deliveries,
                    self._name,
                    reason_suffix,
                    *(lane.value for lane in LANES),
                    DEAD_LETTER_MAXLEN,
                ],
            )
        )
        index = int(result[0])
        if index == 0:
            return list(result[1])
        fields = _fields(result[2])
        return Message(
            id=result[1].decode(),
            lane=LANES[index - 1],
            body=fields.get(b"body", b""),
            enqueued_at=float(fields.get(b"at", b"0")),
            deliveries=int(result[3]),
            consumer=consumer,
        )

    async def get(self, consumer: str, *, timeout_s: float) -> Message | None:
        await self._ensure_groups()
        deadline = anyio.current_time() + timeout_s
        while True:
            try:
                taken = await self._take(consumer)
            except QueueError:
                if self._ready:
                    raise
                await self._ensure_groups()
                taken = await self._take(consumer)
            if isinstance(taken, Message):
                return taken
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return None
            block_ms = max(1, int(min(remaining, MAX_BLOCK_S) * 1000))
            streams: dict[Any, Any] = dict(zip(self._keys.values(), taken, strict=True))
            await self._call(self._redis.xread(streams, count=1, block=block_ms))

    async def ack(self, message: Message) -> None:
        key = self._keys[message.lane]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, GROUP, message.id)
            pipe.xdel(key, message.id)
            await self._call(pipe.execute())

    async def retry(self, message: Message, reason: str) -> None:
        if message.deliveries >= self._settings.max_deliveries:
            await self.bury(
                message, f"{reason}; {poison_reason(message.deliveries, self._settings)}"
            )
            return
        await self._call(
            self._redis.xclaim(
                self._keys[message.lane],
                GROUP,
                message.consumer or "retry",
                0,
                [message.id],
                idle=self._visibility_ms,
                justid=True,
            )
        )

    async def bury(self, message: Message, reason: str) -> None:
        await self._call(
            self._bury_script(
                keys=[self._keys[message.lane], self._dead],
                args=[
                    GROUP,
                    message.id,
                    self._name,
                    message.lane.value,
                    message.body,
                    repr(message.enqueued_at),
                    reason,
                    message.deliveries,
                    DEAD_LETTER_MAXLEN,
                ],
            )
        )

    async def extend(self, message: Message) -> None:
        await self._call(
            self._redis.xclaim(
                self._keys[message.lane],
                GROUP,
                message.consumer or "extend",
                0,
                [message.id],
                justid=True,
            )
        )

    async def drain(self) -> list[Message]:
        out: list[Message] = []
        for lane, key in self._keys.items():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrange(key)
                pipe.delete(key)
                entries, _ = await self._call(pipe.execute())
            out.extend(
                Message(
                    id=entry_id.decode(),
                    lane=lane,
                    body=fields.get(b"body", b""),
                    enqueued_at=float(fields.get(b"at", b"0")),
                    deliveries=0,
                )
                for entry_id, fields in entries
            )
        self._ready = False  # the groups went with the streams
        return out

    async def depth(self) -> dict[Lane, LaneDepth]:
        await self._ensure_groups()
        out: dict[Lane, LaneDepth] = {}
        for lane, key in self._keys.items():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(key)
                pipe.xpending(key, GROUP)
                length, pending = await self._call(pipe.execute())
            in_flight = int(pending["pending"])
            out[lane] = LaneDepth(waiting=max(0, int(length) - in_flight), in_flight=in_flight)
        return out

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        rows = await self._call(self._redis.xrevrange(self._dead, count=limit))
        letters = []
        for _, raw in rows:
            f = {k.decode(): v for k, v in raw.items()}
            letters.append(
                DeadLetter(
                    id=f["id"].decode(),
                    queue=f["queue"].decode(),
                    lane=Lane(f["lane"].decode()),
                    body=f["body"],
                    reason=f["reason"].decode(),
                    deliveries=int(f["deliveries"]),
                    failed_at=float(f["failed_at"]),
                )
            )
        return letters

    async def close(self) -> None:
        """The client belongs to the caller (it is shared); nothing to release here."""
