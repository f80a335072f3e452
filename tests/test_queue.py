"""Acheron: the queue's contract on both implementations (SQLite and Redis Streams)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from tartarus.queue import LANES, Lane, QueueFullError, QueueSettings, WorkQueue
from tartarus.queue.redis_streams import RedisQueue
from tartarus.queue.sqlite import SqliteQueue
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.anyio

QueueFactory = Callable[[QueueSettings], WorkQueue]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "redis"])
async def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueFactory]:
    made: list[WorkQueue] = []
    clients: list[aioredis.Redis] = []
    name = f"test-{uuid.uuid4().hex[:8]}"

    def make(settings: QueueSettings) -> WorkQueue:
        queue: WorkQueue
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis")
            client = aioredis.Redis.from_url(server.url)
            clients.append(client)
            queue = RedisQueue(client, name, settings)
        else:
            queue = SqliteQueue(tmp_path / "queue.db", name, settings)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.close()
    for client in clients:
        await client.aclose()


async def test_put_get_ack(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    message_id = await queue.put(b"hello", Lane.MAIN)
    message = await queue.get("c1", timeout_s=1)
    assert message is not None
    assert (message.id, message.body, message.lane, message.deliveries) == (
        message_id,
        b"hello",
        Lane.MAIN,
        1,
    )
    assert (await queue.depth())[Lane.MAIN].in_flight == 1
    await queue.ack(message)
    await queue.ack(message)  # twice is harmless
    assert await queue.get("c1", timeout_s=0) is None
    assert all(d.waiting == d.in_flight == 0 for d in (await queue.depth()).values())


async def test_lanes_in_priority_order_and_fifo_within(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    for body, lane in [(b"d1", Lane.DEEP), (b"m1", Lane.MAIN), (b"s1", Lane.SWIFT)]:
        await queue.put(body, lane)
    await queue.put(b"m2", Lane.MAIN)
    await queue.put(b"s2", Lane.SWIFT)
    order = []
    while (message := await queue.get("c", timeout_s=0)) is not None:
        order.append(message.body)
        await queue.ack(message)
    assert order == [b"s1", b"s2", b"m1", b"m2", b"d1"]


async def test_full_lane_is_refused_and_others_still_accept(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings(max_depth=2))
    await queue.put(b"1", Lane.DEEP)
    await queue.put(b"2", Lane.DEEP)
    with pytest.raises(QueueFullError, match=r"deep lane .* full .*retry later"):
        await queue.put(b"3", Lane.DEEP)
    await queue.put(b"ok", Lane.SWIFT)
    # In-flight messages still count; acknowledged ones free room.
    message = await queue.get("c", timeout_s=0)
    assert message is not None and message.body == b"ok"
    first = await queue.get("c", timeout_s=0)
    assert first is not None
    with pytest.raises(QueueFullError):
        await queue.put(b"3", Lane.DEEP)
    await queue.ack(first)
    await queue.put(b"3", Lane.DEEP)


async def test_unacknowledged_message_is_delivered_again(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings(visibility_timeout_s=0.2))
    await queue.put(b"work", Lane.MAIN)
    first = await queue.get("crashed", timeout_s=0)
    assert first is not None and first.deliveries == 1
    assert await queue.get("other", timeout_s=0) is None  # invisible while in flight
    again = await queue.get("other", timeout_s=5)
    assert again is not None
    assert (again.id, again.body, again.deliveries, again.consumer) == (
        first.id,
        b"work",
        2,
        "other",
    )
    await queue.ack(again)
    assert await queue.get("other", timeout_s=0.3) is None


async def test_extend_keeps_a_message_invisible(make_queue: QueueFactory) -> None:
    # Each extension comes well inside the timeout, with room for a loaded machine.
    queue = make_queue(QueueSettings(visibility_timeout_s=2))
    await queue.put(b"long", Lane.MAIN)
    message = await queue.get("worker", timeout_s=0)
    assert message is not None
    for _ in range(3):
        await anyio.sleep(0.8)
        await queue.extend(message)
        assert await queue.get("thief", timeout_s=0) is None
    await queue.ack(message)


async def test_poison_message_goes_to_dead_letters_with_reason(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings(visibility_timeout_s=0.05, max_deliveries=2))
    await queue.put(b"poison", Lane.SWIFT)
    seen = []
    for _ in range(2):
        message = await queue.get("c", timeout_s=2)
        assert message is not None
        seen.append((message.body, message.deliveries))
    assert seen == [(b"poison", 1), (b"poison", 2)]
    await anyio.sleep(0.1)
    await queue.put(b"fine", Lane.DEEP)
    message = await queue.get("c", timeout_s=2)
    assert message is not None and message.body == b"fine"
    dead = await queue.dead_letters()
    assert [(d.body, d.lane, d.deliveries) for d in dead] == [(b"poison", Lane.SWIFT, 2)]
    assert "delivered 2 times without an acknowledgement" in dead[0].reason
    assert dead[0].queue == queue.name


async def test_retry_redelivers_at_once_then_dead_letters(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings(visibility_timeout_s=60, max_deliveries=2))
    await queue.put(b"flaky", Lane.MAIN)
    first = await queue.get("c", timeout_s=0)
    assert first is not None
    await queue.retry(first, "node refused it")
    second = await queue.get("c", timeout_s=2)
    assert second is not None and (second.body, second.deliveries) == (b"flaky", 2)
    await queue.retry(second, "node refused it again")
    assert await queue.get("c", timeout_s=0.2) is None
    (dead,) = await queue.dead_letters()
    assert dead.reason.startswith("node refused it again; delivered 2 times")


async def test_bury_records_the_reason(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    await queue.put(b"bad request", Lane.DEEP)
    message = await queue.get("c", timeout_s=0)
    assert message is not None
    await queue.bury(message, "no node has the wasm backend")
    await queue.bury(message, "twice")  # already gone: nothing more is recorded
    assert [(d.body, d.reason) for d in await queue.dead_letters()] == [
        (b"bad request", "no node has the wasm backend")
    ]
    assert (await queue.depth())[Lane.DEEP].waiting == 0


async def test_blocked_consumer_wakes_on_put(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    got = []

    async def consume() -> None:
        got.append(await queue.get("c", timeout_s=10))

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await anyio.sleep(0.1)
        await queue.put(b"late", Lane.DEEP)
    assert got[0] is not None and got[0].body == b"late"


async def test_depth_counts_waiting_and_in_flight_per_lane(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    for lane in LANES:
        await queue.put(b"x", lane)
        await queue.put(b"y", lane)
    await queue.get("c", timeout_s=0)
    depth = await queue.depth()
    assert (depth[Lane.SWIFT].waiting, depth[Lane.SWIFT].in_flight) == (1, 1)
    assert (depth[Lane.DEEP].waiting, depth[Lane.DEEP].in_flight) == (2, 0)


async def test_drain_takes_everything_waiting_or_in_flight(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueSettings())
    await queue.put(b"a", Lane.DEEP)
    await queue.put(b"b", Lane.SWIFT)
    await queue.put(b"c", Lane.MAIN)
    assert await queue.get("dead-node", timeout_s=0) is not None
    assert sorted(m.body for m in await queue.drain()) == [b"a", b"b", b"c"]
    assert await queue.drain() == []
    await queue.put(b"after", Lane.MAIN)  # still usable
    message = await queue.get("c", timeout_s=1)
    assert message is not None and message.body == b"after"
