"""Hades on Redis: a node is a hash with a TTL that each heartbeat renews, so Redis itself
forgets a node that stops beating; reservations, quarantine and heat history are hashes.

Keys (prefix `tartarus:`): `nodes` (set of ids), `node:ID` (hash: spec, usage,
draining, joined_at, last_seen; expires after the TTL), `node-specs` (id → spec, kept
until the node is reaped so the reaper knows what it removes), `node:ID:res` (sandbox →
reservation), `res` (sandbox → node), `quarantine` (subject → reason), `heat`.
Check-and-reserve and reaping are Lua scripts: atomic across API servers.
"""

from __future__ import annotations

import time

import msgspec
import redis.asyncio as aioredis

from tartarus.scheduling.heat import HeatHistory
from tartarus.scheduling.nodes import NodeSpec, NodeState, NodeUsage, Reservation
from tartarus.scheduling.registry import DEFAULT_TTL_S

_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'usage', ARGV[1], 'draining', ARGV[2], 'last_seen', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: node hash, node reservations, sandbox → node index.
# ARGV: sandbox id, node id, reservation JSON, vcpus, memory MiB.
_RESERVE = """
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held then
  if held == ARGV[2] then return '' end
  return 'already reserved on node ' .. held
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 'node ' .. ARGV[2] .. ' is gone' end
if redis.call('HGET', KEYS[1], 'draining') == '1' then
  return 'node ' .. ARGV[2] .. ' is draining'
end
local cap = cjson.decode(redis.call('HGET', KEYS[1], 'spec')).capacity
local vcpus, memory, count = 0, 0, 0
for _, doc in ipairs(redis.call('HVALS', KEYS[2])) do
  local r = cjson.decode(doc)
  vcpus = vcpus + r.vcpus
  memory = memory + r.memory_mib
  count = count + 1
end
if vcpus + tonumber(ARGV[4]) > cap.vcpus + 1e-9 then
  return 'node ' .. ARGV[2] .. ' has no ' .. ARGV[4] .. ' vCPUs free'
end
if memory + tonumber(ARGV[5]) > cap.memory_mib then
  return 'node ' .. ARGV[2] .. ' has no ' .. ARGV[5] .. ' MiB free'
end
if count >= cap.max_sandboxes then return 'node ' .. ARGV[2] .. ' is full' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return ''
"""

_RELEASE = """
local node = redis.call('HGET', KEYS[1], ARGV[1])
if not node then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', ARGV[2] .. node .. ':res', ARGV[1])
return 1
"""

# KEYS: nodes set, node hash, node reservations, index, specs. ARGV: node id, force (0/1).
# Returns {spec, reservation docs...} to the one caller that removed the node, else {}.
_REMOVE = """
if ARGV[2] == '0' and redis.call('EXISTS', KEYS[2]) == 1 then return {} end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return {} end
local spec = redis.call('HGET', KEYS[5], ARGV[1]) or ''
redis.call('HDEL', KEYS[5], ARGV[1])
local docs = redis.call('HVALS', KEYS[3])
for _, sandbox in ipairs(redis.call('HKEYS', KEYS[3])) do redis.call('HDEL', KEYS[4], sandbox) end
redis.call('DEL', KEYS[2], KEYS[3])
local out = {spec}
for _, d in ipairs(docs) do out[#out + 1] = d end
return out
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisRegistry:
    def __init__(
        self, client: aioredis.Redis, *, ttl_s: float = DEFAULT_TTL_S, prefix: str = "tartarus:"
    ) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._p = prefix
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._remove_script = client.register_script(_REMOVE)

    @property
    def ttl_s(self) -> float:
        return self._ttl_s

    def _node(self, node_id: str) -> str:
        return f"{self._p}node:{node_id}"

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self._ttl_s * 1000))

    async def register(self, spec: NodeSpec) -> None:
        now = repr(time.time())
        doc = msgspec.json.encode(spec)
        key = self._node(spec.id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"spec": doc, "draining": "0", "last_seen": now})
            pipe.hsetnx(key, "joined_at", now)
            pipe.hsetnx(key, "usage", msgspec.json.encode(NodeUsage()))
            pipe.pexpire(key, self._ttl_ms)
            pipe.hset(f"{self._p}node-specs", spec.id, doc)
            pipe.sadd(f"{self._p}nodes", spec.id)
            await pipe.execute()

    async def heartbeat(self, node_id: str, usage: NodeUsage, *, draining: bool) -> bool:
        done = await self._heartbeat(
            keys=[self._node(node_id)],
            args=[msgspec.json.encode(usage), int(draining), repr(time.time()), self._ttl_ms],
        )
        return bool(done)

    async def _states(self, ids: list[str]) -> list[NodeState]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for node_id in ids:
                pipe.hgetall(self._node(node_id))
                pipe.hvals(self._node(node_id) + ":res")
            raw = await pipe.execute()
        states = []
        for i in range(0, len(raw), 2):
            fields, docs = raw[i], raw[i + 1]
            if b"spec" not in fields:
                continue  # its TTL ran out: dead, waiting for the reaper
            states.append(
                NodeState(
                    spec=msgspec.json.decode(fields[b"spec"], type=NodeSpec),
                    usage=msgspec.json.decode(fields.get(b"usage", b"{}"), type=NodeUsage),
                    reservations=[msgspec.json.decode(d, type=Reservation) for d in docs],
                    draining=fields.get(b"draining") == b"1",
                    joined_at=float(fields.get(b"joined_at", 0)),
                    last_seen=float(fields.get(b"last_seen", 0)),
                )
            )
        return states

    async def nodes(self) -> list[NodeState]:
        ids = sorted(_text(m) for m in await self._redis.smembers(f"{self._p}nodes"))
        return await self._states(ids)

    async def node(self, node_id: str) -> NodeState | None:
        states = await self._states([node_id])
        return states[0] if states else None

    async def reserve(self, node_id: str, reservation: Reservation) -> str | None:
        why = await self._reserve(
            keys=[self._node(node_id), self._node(node_id) + ":res", f"{self._p}res"],
            args=[
                reservation.sandbox_id,
                node_id,
                msgspec.json.encode(reservation),
                reservation.vcpus,
                reservation.memory_mib,
            ],
        )
        return _text(why) or None

    async def release(self, sandbox_id: str) -> bool:
        done = await self._release(keys=[f"{self._p}res"], args=[sandbox_id, f"{self._p}node:"])
        return bool(done)

    async def _remove(self, node_id: str, *, force: bool) -> NodeState | None:
        out = await self._remove_script(
            keys=[
                f"{self._p}nodes",
                self._node(node_id),
                self._node(node_id) + ":res",
                f"{self._p}res",
                f"{self._p}node-specs",
            ],
            args=[node_id, int(force)],
        )
        if not out or not out[0]:
            return None
        return NodeState(
            spec=msgspec.json.decode(out[0], type=NodeSpec),
            reservations=[msgspec.json.decode(d, type=Reservation) for d in out[1:]],
        )

    async def reap(self) -> list[NodeState]:
        removed = []
        for member in await self._redis.smembers(f"{self._p}nodes"):
            state = await self._remove(_text(member), force=False)
            if state is not None:
                removed.append(state)
        return removed

    async def deregister(self, node_id: str) -> NodeState | None:
        return await self._remove(node_id, force=True)

    async def quarantine(self, subject: str, reason: str) -> None:
        await self._redis.hset(f"{self._p}quarantine", subject, reason)

    async def release_quarantine(self, subject: str) -> bool:
        return bool(await self._redis.hdel(f"{self._p}quarantine", subject))

    async def quarantined(self) -> dict[str, str]:
        raw = await self._redis.hgetall(f"{self._p}quarantine")
        return {_text(k): _text(v) for k, v in raw.items()}

    async def heat_history(self, key: str) -> HeatHistory | None:
        raw = await self._redis.hget(f"{self._p}heat", key)
        return None if raw is None else msgspec.json.decode(raw, type=HeatHistory)

    async def record_heat(self, key: str, cpu_share: float, memory_share: float) -> None:
        # Last writer wins on a race: history is a hint, not an account.
        history = await self.heat_history(key) or HeatHistory()
        updated = history.observe(cpu_share, memory_share)
        await self._redis.hset(f"{self._p}heat", key, msgspec.json.encode(updated))

    async def close(self) -> None:
        """The client is shared and closed by its owner."""
