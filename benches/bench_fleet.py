"""Fleet benchmarks: scheduling decisions per second, queue enqueue→dequeue latency
on SQLite and on Redis Streams beside a bare XADD/XREADGROUP loop on the same
redis-server (redis-py), and a fleet-wide quota hold + release (Minos in Redis and in
SQLite) beside the single-host in-memory Minos, in the same run; plus a count check:
two Redis clients (two API servers) racing past a quota admit exactly the quota; and
Alecto: how late after its deadline a jail sandbox's teardown finishes (the value of
each timeout's event), beside coreutils `timeout -s KILL` killing a `sleep`.

Run: `python -m benches.bench_fleet` (writes benches/results/fleet.json).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
from tests.support.redis_server import redis_server
from tests.support.server import short_dir

from benches.harness import Stats, measure, measure_async, ratio, report, write_result
from tartarus.api.types import CreateSandboxRequest, ResourcesBody
from tartarus.auth.principal import SYSTEM
from tartarus.config import Settings
from tartarus.fleet.quota import FleetQuota, RedisQuota, SqliteQuota
from tartarus.node.manager import SandboxManager
from tartarus.node.provider import HostRuntimes
from tartarus.node.store import Store
from tartarus.paths import default_cache_dir
from tartarus.policy.documents import PolicySpec, Quotas
from tartarus.policy.quotas import QuotaKeeper, Usage
from tartarus.policy.verdicts import AdmissionRequest
from tartarus.queue import Lane, QueueSettings, WorkQueue
from tartarus.queue.redis_streams import RedisQueue
from tartarus.queue.sqlite import SqliteQueue
from tartarus.runtime.types import Backend, Resources
from tartarus.scheduling.heat import Heat
from tartarus.scheduling.nodes import (
    NodeCapacity,
    NodeSpec,
    NodeState,
    Placement,
    PlacementRules,
    Reservation,
    Taint,
)
from tartarus.scheduling.registry import Registry, SqliteRegistry
from tartarus.scheduling.registry_redis import RedisRegistry
from tartarus.scheduling.scheduler import schedule

NODES = 100
DECISIONS = 2000
MESSAGES = 500
RESERVATIONS = 300


def fleet_nodes() -> list[NodeState]:
    nodes = []
    for i in range(NODES):
        spec = NodeSpec(
            id=f"node-{i:03d}",
            address=f"http://10.0.0.{i}:1",
            capacity=NodeCapacity(vcpus=64, memory_mib=262144, backends=[Backend.JAIL]),
            labels={"zone": f"z{i % 4}"},
            taints=[Taint(key="gpu")] if i % 10 == 0 else [],
            pool="hot" if i % 5 == 0 else "general",
        )
        reserved = [
            Reservation(sandbox_id=f"s{i}-{j}", vcpus=0.5, memory_mib=256, groups=[f"g{j % 3}"])
            for j in range(i % 20)
        ]
        nodes.append(NodeState(spec=spec, reservations=reserved))
    return nodes


def placement(i: int, *, affinity: bool = True) -> Placement:
    groups = {"anti_affinity": ["db"], "affinity": ["g2"]} if affinity else {}
    return Placement(
        sandbox_id=f"sb-{i:016x}",
        resources=Resources(vcpus=0.5, memory_mib=256),
        rules=PlacementRules(node_selector={"zone": f"z{i % 4}"}, **groups),  # type: ignore[arg-type]
    )


def bench_decisions() -> dict[str, Any]:
    nodes = fleet_nodes()
    out: dict[str, Any] = {"nodes": NODES, "decisions": DECISIONS}
    for affinity in (False, True):
        started = time.perf_counter()
        for i in range(DECISIONS):
            schedule(placement(i, affinity=affinity), nodes, heat=Heat.WARM)
        rate = DECISIONS / (time.perf_counter() - started)
        rules = "labels, taints, pools, capacity" + (", affinity" if affinity else "")
        print(f"scheduling: {rate:,.0f} decisions/s over {NODES} nodes ({rules}; no reservation)")
        out["decisions_per_s" + ("_with_affinity" if affinity else "")] = round(rate, 1)
    return out


async def bench_reserve(registry: Registry, label: str) -> dict[str, Any]:
    """Decision plus an atomic reservation in the registry, one at a time."""
    for node in fleet_nodes()[:10]:
        await registry.register(node.spec)
    started = time.perf_counter()
    for i in range(RESERVATIONS):
        p = placement(i)
        decision = schedule(p, await registry.nodes(), heat=Heat.WARM)
        await registry.reserve(
            decision.node_id,
            Reservation(sandbox_id=p.sandbox_id, vcpus=0.5, memory_mib=256),
        )
    elapsed = time.perf_counter() - started
    rate = RESERVATIONS / elapsed
    print(f"placement with reservation ({label}, 10 nodes): {rate:,.0f}/s")
    return {"placements_per_s": round(rate, 1), "nodes": 10}


async def queue_round_trip(queue: WorkQueue) -> Stats:
    async def once() -> None:
        await queue.put(b"x" * 256, Lane.MAIN)
        message = await queue.get("bench", timeout_s=5)
        assert message is not None
        await queue.ack(message)

    return await measure_async(once, runs=MESSAGES, warmup=20)


async def bare_round_trip(client: aioredis.Redis) -> Stats:
    stream = f"bare:{uuid.uuid4().hex[:8]}"
    await client.xgroup_create(stream, "g", id="0", mkstream=True)

    async def once() -> None:
        await client.xadd(stream, {"body": b"x" * 256})
        got: Any = await client.xreadgroup("g", "bench", {stream: ">"}, count=1, block=5000)
        entry_id: bytes = got[0][1][0][0]
        await client.xack(stream, "g", entry_id)
        await client.xdel(stream, entry_id)

    return await measure_async(once, runs=MESSAGES, warmup=20)


QUOTA_ROUNDS = 500
RACERS = 100
RACE_QUOTA = 20


def minos_round_trip() -> Stats:
    """The single-host Minos: check, hold and release in memory (the peer)."""
    minos = QuotaKeeper()
    admission = AdmissionRequest(
        caller=msgspec.structs.replace(SYSTEM, tenant="bench"),
        request=CreateSandboxRequest(),
        policy=PolicySpec(resources=Quotas(max_sandboxes=1000)),
    )

    def once() -> None:
        _, hold = minos.rule(admission)
        assert hold is not None
        hold.release()

    return measure(once, runs=QUOTA_ROUNDS, warmup=20)


async def shared_round_trip(quota: FleetQuota) -> Stats:
    want = Usage(template="base", vcpus=0.5, memory_mib=256)
    quotas = Quotas(max_sandboxes=1000, max_vcpus=1000.0)
    ids = (f"sb-{i:016x}" for i in range(10**9))

    async def once() -> None:
        sandbox_id = next(ids)
        assert await quota.hold("bench", sandbox_id, want, quotas) is None
        await quota.release("bench", sandbox_id)

    return await measure_async(once, runs=QUOTA_ROUNDS, warmup=20)


async def quota_race(url: str) -> dict[str, Any]:
    """RACERS creates at once through two clients (two API servers): how many get in."""
    clients = [aioredis.Redis.from_url(url) for _ in range(2)]
    quotas = [RedisQuota(c, prefix="race:") for c in clients]
    want = Usage(template="base", vcpus=0.5, memory_mib=256)
    admitted = 0

    async def one(i: int) -> None:
        nonlocal admitted
        refusal = await quotas[i % 2].hold(
            "race", f"sb-{i:016x}", want, Quotas(max_sandboxes=RACE_QUOTA)
        )
        admitted += refusal is None

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(RACERS):
            tg.start_soon(one, i)
    elapsed = time.perf_counter() - started
    for c in clients:
        await c.aclose()
    print(f"quota race: {RACERS} creates, quota {RACE_QUOTA}: {admitted} admitted")
    assert admitted == RACE_QUOTA
    return {
        "creates": RACERS,
        "quota": RACE_QUOTA,
        "admitted": admitted,
        "elapsed_ms": round(elapsed * 1000, 1),
    }


ALECTO_SANDBOXES = 10


async def alecto() -> dict[str, Any]:
    """Jail sandboxes with a 1 s timeout on a node's manager (no grace): seconds between
    each deadline and the end of its teardown; the peer is `timeout -s KILL 1 sleep 5`."""
    late: list[float] = []
    with short_dir() as base:
        settings = Settings(
            cache_dir=default_cache_dir(), state_dir=base / "state", runtime_dir=base / "run"
        )
        store = Store(base / "state.db")
        provider = HostRuntimes(settings, only=[Backend.JAIL])
        async with SandboxManager(store, provider, timeout_grace_s=0).running() as manager:
            ids = []
            for _ in range(ALECTO_SANDBOXES):
                record, _ = await manager.create(
                    CreateSandboxRequest(
                        backend=Backend.JAIL,
                        timeout_s=1,
                        resources=ResourcesBody(vcpus=0.1, memory_mib=32),
                    ),
                    caller=SYSTEM,
                )
                ids.append(record.id)
            with anyio.fail_after(60):
                while manager.live_count():  # noqa: ASYNC110 - the manager has no event for it
                    await anyio.sleep(0.05)
            for sandbox_id in ids:
                ended = store.get(sandbox_id)
                assert ended is not None and ended.detail == "timed out", ended
                assert ended.ended_at is not None and ended.expires_at is not None
                late.append(ended.ended_at - ended.expires_at)
        store.close()
    peer: list[float] = []
    for _ in range(ALECTO_SANDBOXES):
        started = time.perf_counter()
        await anyio.run_process(["timeout", "-s", "KILL", "1", "sleep", "5"], check=False)
        peer.append(time.perf_counter() - started - 1.0)
    ours, theirs = Stats.of(late), Stats.of(peer)
    report("Alecto: teardown after the deadline vs timeout -s KILL", ours, theirs, "timeout")
    return {
        "what": "seconds from a sandbox's deadline to the end of its teardown (jail, no grace)",
        "sandboxes": ALECTO_SANDBOXES,
        "late": ours,
        "timeout_kill_sleep": theirs,
        "ratio": ratio(ours, theirs),
    }


async def main() -> None:
    results: dict[str, Any] = {"scheduling": bench_decisions()}
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp) / "redis") as server:
        client = aioredis.Redis.from_url(server.url)
        sqlite_queue = SqliteQueue(Path(tmp) / "queue.db", "bench", QueueSettings())
        redis_queue = RedisQueue(client, "bench", QueueSettings())
        sqlite_stats = await queue_round_trip(sqlite_queue)
        redis_stats = await queue_round_trip(redis_queue)
        bare_stats = await bare_round_trip(client)
        results["scheduling"]["with_reservation_sqlite"] = await bench_reserve(
            SqliteRegistry(Path(tmp) / "registry.db"), "SQLite"
        )
        results["scheduling"]["with_reservation_redis"] = await bench_reserve(
            RedisRegistry(client, prefix="bench:"), "Redis"
        )
        redis_quota = await shared_round_trip(RedisQuota(client, prefix="bench:"))
        sqlite_quota = await shared_round_trip(SqliteQuota(Path(tmp) / "quota.db"))
        results["quota_race"] = await quota_race(server.url)
        await client.aclose()
    minos = minos_round_trip()
    report("fleet-wide quota hold+release, Redis vs in-memory Minos", redis_quota, minos, "Minos")
    report("fleet-wide quota hold+release, SQLite vs in-memory Minos", sqlite_quota, minos, "Minos")
    results["quota_hold_release"] = {
        "what": "check, hold and release of one tenant's share, sequential",
        "redis": redis_quota,
        "sqlite": sqlite_quota,
        "in_memory_minos": minos,
        "ratio_redis_vs_minos": ratio(redis_quota, minos),
        "ratio_sqlite_vs_minos": ratio(sqlite_quota, minos),
    }
    print("queue put→get→ack, one message at a time, 256-byte body:")
    report("Redis Streams queue vs bare XADD/XREADGROUP", redis_stats, bare_stats, "bare redis-py")
    report("SQLite queue vs bare XADD/XREADGROUP", sqlite_stats, bare_stats, "bare redis-py")
    results["queue_round_trip"] = {
        "what": "put, get and ack of one 256-byte message, sequential, same process",
        "sqlite": sqlite_stats,
        "redis_streams": redis_stats,
        "bare_xadd_xreadgroup": bare_stats,
        "ratio_redis_vs_bare": ratio(redis_stats, bare_stats),
        "ratio_sqlite_vs_bare": ratio(sqlite_stats, bare_stats),
    }
    results["alecto"] = await alecto()
    path = write_result("fleet", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    anyio.run(main)
