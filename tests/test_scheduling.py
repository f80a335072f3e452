"""Moirai, Phlegethon and Hades: placement rules, heat classes, the registry on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from tartarus.queue import Lane
from tartarus.runtime.types import Backend, Resources
from tartarus.scheduling.heat import Heat, HeatHistory, PoolRouting, classify, default_lane
from tartarus.scheduling.nodes import (
    InvalidSpecError,
    NodeCapacity,
    NodeSpec,
    NodeState,
    NodeUsage,
    Placement,
    PlacementRules,
    Reservation,
    Taint,
    TaintEffect,
    Toleration,
    parse_label,
    parse_taint,
)
from tartarus.scheduling.registry import Registry, SqliteRegistry
from tartarus.scheduling.registry_redis import RedisRegistry
from tartarus.scheduling.scheduler import NoNodeFitsError, Strategy, schedule
from tests.support.redis_server import RedisServer


def node(
    node_id: str,
    *,
    vcpus: float = 4,
    memory_mib: int = 4096,
    backends: tuple[Backend, ...] = (Backend.JAIL,),
    labels: dict[str, str] | None = None,
    taints: list[Taint] | None = None,
    pool: str = "general",
    reserved: list[Reservation] | None = None,
    draining: bool = False,
    max_sandboxes: int = 1000,
) -> NodeState:
    return NodeState(
        spec=NodeSpec(
            id=node_id,
            address=f"http://{node_id}:1",
            capacity=NodeCapacity(
                vcpus=vcpus,
                memory_mib=memory_mib,
                backends=list(backends),
                max_sandboxes=max_sandboxes,
            ),
            labels=labels or {},
            taints=taints or [],
            pool=pool,
        ),
        reservations=reserved or [],
        draining=draining,
    )


def want(
    vcpus: float = 1,
    memory_mib: int = 256,
    backend: Backend = Backend.AUTO,
    quarantined: bool = False,
    **rules: object,
) -> Placement:
    return Placement(
        sandbox_id="sb-0000000000000001",
        resources=Resources(vcpus=vcpus, memory_mib=memory_mib),
        backend=backend,
        rules=PlacementRules(**rules),  # type: ignore[arg-type]
        quarantined=quarantined,
    )


def res(sandbox: str, vcpus: float = 1, memory_mib: int = 256, *groups: str) -> Reservation:
    return Reservation(sandbox_id=sandbox, vcpus=vcpus, memory_mib=memory_mib, groups=list(groups))


# --- the scheduler -------------------------------------------------------------------


def test_least_loaded_spreads_and_bin_packing_fills() -> None:
    nodes = [node("a", reserved=[res("x", 2)]), node("b")]
    assert schedule(want(), nodes, heat=Heat.WARM).node_id == "b"
    assert schedule(want(), nodes, heat=Heat.WARM, strategy=Strategy.BIN_PACKING).node_id == "a"


def test_measured_utilisation_counts_in_the_load() -> None:
    busy = node("a")
    busy.usage = NodeUsage(cpu_utilisation=0.95)
    assert schedule(want(), [busy, node("b")], heat=Heat.WARM).node_id == "b"


def test_filters_say_why_each_node_was_out() -> None:
    nodes = [
        node("draining", draining=True),
        node("wasm-only", backends=(Backend.WASM,)),
        node("unlabelled"),
        node("tainted", labels={"zone": "a"}, taints=[parse_taint("gpu=yes:NoSchedule")]),
        node("small", vcpus=0.5, labels={"zone": "a"}),
        node("full", labels={"zone": "a"}, max_sandboxes=1, reserved=[res("y", 0.1, 1)]),
    ]
    with pytest.raises(NoNodeFitsError) as caught:
        schedule(want(backend=Backend.JAIL, node_selector={"zone": "a"}), nodes, heat=Heat.WARM)
    assert caught.value.reasons == {
        "draining": "draining",
        "wasm-only": "no jail backend (has wasm)",
        "unlabelled": "label zone=a missing",
        "tainted": "taint gpu=yes:NoSchedule not tolerated",
        "small": "needs 1 vCPUs, 0.5 free",
        "full": "full (1 sandboxes)",
    }
    assert "no node can run sandbox sb-0000000000000001" in str(caught.value)


def test_no_nodes_at_all_says_to_start_an_agent() -> None:
    with pytest.raises(NoNodeFitsError, match="tartarus agent --join"):
        schedule(want(), [], heat=Heat.COLD)


def test_tolerations_and_prefer_no_schedule() -> None:
    gpu = node("gpu", taints=[Taint(key="gpu", value="yes")])
    assert (
        schedule(want(tolerations=[Toleration(key="gpu")]), [gpu], heat=Heat.WARM).node_id == "gpu"
    )
    with pytest.raises(NoNodeFitsError):
        schedule(want(tolerations=[Toleration(key="gpu", value="no")]), [gpu], heat=Heat.WARM)
    soft = node("soft", taints=[Taint(key="spot", effect=TaintEffect.PREFER_NO_SCHEDULE)])
    plain = node("plain", reserved=[res("x", 3)])
    # The untainted node wins although it is busier; the tainted one is the fallback.
    assert schedule(want(), [soft, plain], heat=Heat.WARM).node_id == "plain"
    assert schedule(want(vcpus=2), [soft, plain], heat=Heat.WARM).node_id == "soft"


def test_affinity_and_anti_affinity() -> None:
    nodes = [node("a", reserved=[res("db", 1, 256, "db")]), node("b")]
    assert schedule(want(affinity=["db"]), nodes, heat=Heat.WARM).node_id == "a"
    assert schedule(want(anti_affinity=["db"]), nodes, heat=Heat.WARM).node_id == "b"
    # Affinity to a group that runs nowhere yet does not constrain the first one.
    assert schedule(want(affinity=["web"]), nodes, heat=Heat.WARM).node_id == "b"
    with pytest.raises(NoNodeFitsError, match="anti-affinity"):
        schedule(want(anti_affinity=["db"]), nodes[:1], heat=Heat.WARM)


def test_quarantined_work_only_in_the_quarantine_pool_and_nothing_else_there() -> None:
    nodes = [node("q", pool="quarantine"), node("g")]
    assert schedule(want(quarantined=True), nodes, heat=Heat.COLD).node_id == "q"
    assert schedule(want(), nodes, heat=Heat.COLD).node_id == "g"
    with pytest.raises(NoNodeFitsError, match="quarantine"):
        schedule(want(quarantined=True), nodes[1:], heat=Heat.COLD)
    with pytest.raises(NoNodeFitsError, match="quarantined work only"):
        schedule(want(), nodes[:1], heat=Heat.COLD)


def test_heat_classes_route_to_pools_in_preference_order() -> None:
    nodes = [node("g"), node("h", pool="hot", vcpus=16, memory_mib=32768)]
    assert schedule(want(), nodes, heat=Heat.COLD).node_id == "g"
    assert schedule(want(), nodes, heat=Heat.HOT).pool == "hot"
    # Hot work falls back to the general pool when the hot pool is full.
    nodes[1].reservations.append(res("big", 16))
    assert schedule(want(), nodes, heat=Heat.HOT).pool == "general"
    strict = PoolRouting(hot=["hot"])
    with pytest.raises(NoNodeFitsError, match="does not take this heat class"):
        schedule(want(), nodes, heat=Heat.HOT, routing=strict)


def test_classify_by_request_and_history() -> None:
    assert classify(Resources(vcpus=0.25, memory_mib=128)) is Heat.COLD
    assert classify(Resources(vcpus=1, memory_mib=512)) is Heat.WARM
    assert classify(Resources(vcpus=4, memory_mib=8192)) is Heat.HOT
    assert classify(Resources(vcpus=32, memory_mib=1024)) is Heat.INFERNO
    burning = HeatHistory().observe(0.9, 0.2)
    assert classify(Resources(vcpus=0.25, memory_mib=128), burning) is Heat.WARM
    assert classify(Resources(vcpus=32, memory_mib=1024), burning) is Heat.INFERNO
    assert default_lane(Heat.COLD) is Lane.SWIFT and default_lane(Heat.INFERNO) is Lane.DEEP


def test_parse_taints_and_labels() -> None:
    assert parse_taint("gpu") == Taint(key="gpu")
    assert str(parse_taint("spot=1:PreferNoSchedule")) == "spot=1:PreferNoSchedule"
    assert parse_label("zone=eu-1") == ("zone", "eu-1")
    for bad in ("", "a b", "k=v:Never"):
        with pytest.raises(InvalidSpecError):
            parse_taint(bad)
    for bad in ("novalue", "=v", "k=a b"):
        with pytest.raises(InvalidSpecError):
            parse_label(bad)


@given(
    capacities=st.lists(
        st.tuples(st.integers(1, 8), st.integers(256, 4096)), min_size=1, max_size=5
    ),
    asks=st.lists(st.tuples(st.sampled_from([0.5, 1, 2]), st.integers(64, 1024)), max_size=30),
    strategy=st.sampled_from(Strategy),
)
def test_placing_greedily_never_overcommits(
    capacities: list[tuple[int, int]], asks: list[tuple[float, int]], strategy: Strategy
) -> None:
    nodes = [node(f"n{i}", vcpus=v, memory_mib=m) for i, (v, m) in enumerate(capacities)]
    for i, (vcpus, memory) in enumerate(asks):
        placement = want(vcpus=vcpus, memory_mib=memory)
        try:
            decision = schedule(placement, nodes, heat=Heat.WARM, strategy=strategy)
        except NoNodeFitsError as e:
            # Refused only when no node has room.
            assert all("needs" in why for why in e.reasons.values())
            continue
        chosen = next(n for n in nodes if n.id == decision.node_id)
        chosen.reservations.append(res(f"s{i}", vcpus, memory))
    for n in nodes:
        assert n.reserved_vcpus <= n.spec.capacity.vcpus
        assert n.reserved_memory_mib <= n.spec.capacity.memory_mib


# --- the registry, on SQLite and on Redis ------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Long enough that a loaded CI machine does not miss a heartbeat between two sleeps.
TTL_S = 1.5


@pytest.fixture(params=["sqlite", "redis"])
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    if request.param == "sqlite":
        reg: Registry = SqliteRegistry(tmp_path / "registry.db", ttl_s=TTL_S)
        yield reg
        await reg.close()
        return
    server: RedisServer = request.getfixturevalue("redis")
    client = aioredis.Redis.from_url(server.url)
    prefix = f"t{tmp_path.name}:"
    yield RedisRegistry(client, ttl_s=TTL_S, prefix=prefix)
    await client.aclose()


def spec(node_id: str, vcpus: float = 2, memory_mib: int = 1024) -> NodeSpec:
    return node(node_id, vcpus=vcpus, memory_mib=memory_mib, labels={"zone": "a"}).spec


@pytest.mark.anyio
async def test_register_heartbeat_and_list(registry: Registry) -> None:
    await registry.register(spec("n1"))
    assert await registry.heartbeat(
        "n1", NodeUsage(sandboxes=3, cpu_utilisation=0.5), draining=False
    )
    (state,) = await registry.nodes()
    assert state.id == "n1" and state.spec.labels == {"zone": "a"}
    assert state.usage.sandboxes == 3 and not state.draining
    assert await registry.heartbeat("n1", NodeUsage(), draining=True)
    got = await registry.node("n1")
    assert got is not None and got.draining
    assert not await registry.heartbeat("ghost", NodeUsage(), draining=False)


@pytest.mark.anyio
async def test_reservations_are_checked_atomically_and_released(registry: Registry) -> None:
    await registry.register(spec("n1", vcpus=2, memory_mib=1024))
    assert await registry.reserve("n1", res("a", 1, 512, "db")) is None
    assert await registry.reserve("n1", res("a", 1, 512, "db")) is None  # idempotent
    assert "has no 2 vCPUs free" in (await registry.reserve("n1", res("b", 2, 10)) or "")
    assert "MiB free" in (await registry.reserve("n1", res("c", 0.5, 600)) or "")
    assert "is gone" in (await registry.reserve("nope", res("d")) or "")
    (state,) = await registry.nodes()
    assert state.reserved_vcpus == 1 and state.group_counts() == {"db": 1}
    assert await registry.release("a")
    assert not await registry.release("a")
    (state,) = await registry.nodes()
    assert state.reservations == []
    await registry.heartbeat("n1", NodeUsage(), draining=True)
    assert "draining" in (await registry.reserve("n1", res("e")) or "")


@pytest.mark.anyio
async def test_racing_reservations_never_overcommit(registry: Registry) -> None:
    await registry.register(spec("n1", vcpus=4, memory_mib=100_000))
    outcomes: list[str | None] = []

    async def one(i: int) -> None:
        outcomes.append(await registry.reserve("n1", res(f"s{i}", 1, 10)))

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(one, i)
    assert outcomes.count(None) == 4
    (state,) = await registry.nodes()
    assert state.reserved_vcpus == 4


@pytest.mark.anyio
async def test_dead_nodes_are_reaped_once_with_their_reservations(registry: Registry) -> None:
    await registry.register(spec("dies"))
    await registry.register(spec("lives"))
    await registry.reserve("dies", res("s1"))
    for _ in range(4):
        await anyio.sleep(TTL_S / 3)
        await registry.heartbeat("lives", NodeUsage(), draining=False)
    assert [n.id for n in await registry.nodes()] == ["lives"]
    first, second = await registry.reap(), await registry.reap()
    assert [(n.id, [r.sandbox_id for r in n.reservations]) for n in first] == [("dies", ["s1"])]
    assert second == []
    assert not await registry.release("s1")  # released with the node
    # A node that comes back registers again, fresh.
    await registry.register(spec("dies"))
    assert {n.id for n in await registry.nodes()} == {"dies", "lives"}


@pytest.mark.anyio
async def test_deregister_returns_what_the_node_held(registry: Registry) -> None:
    await registry.register(spec("n1"))
    await registry.reserve("n1", res("s1"))
    gone = await registry.deregister("n1")
    assert gone is not None and [r.sandbox_id for r in gone.reservations] == ["s1"]
    assert await registry.deregister("n1") is None
    assert await registry.nodes() == []


@pytest.mark.anyio
async def test_quarantine_and_heat_history(registry: Registry) -> None:
    await registry.quarantine("tenant:mallory", "memory hog killed 3 times")
    assert await registry.quarantined() == {"tenant:mallory": "memory hog killed 3 times"}
    assert await registry.release_quarantine("tenant:mallory")
    assert not await registry.release_quarantine("tenant:mallory")
    assert await registry.heat_history("template:py") is None
    await registry.record_heat("template:py", 1.0, 0.5)
    await registry.record_heat("template:py", 0.0, 0.5)
    history = await registry.heat_history("template:py")
    assert history is not None and history.samples == 2
    assert history.cpu_share == pytest.approx(0.7)
