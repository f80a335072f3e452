"""Idempotency keys on the fleet's book, on a real redis-server and on SQLite: a create
claims its key under a lease it renews; inserting the record binds the key in the same
step and only if the claim is still the create's; a claim left by a server that died
lapses and a retry takes it over. The book also rides out a Redis restart, and a node's
report that lands late cannot move a record back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import SYSTEM
from tartarus.errors import UnavailableError
from tartarus.fleet import book as book_module
from tartarus.fleet.book import ClaimLostError, KeyClaim, RedisBook, SandboxBook, SqliteBook
from tartarus.fleet.error_stream import ErrorStream
from tartarus.fleet.intake import Intake
from tartarus.fleet.metrics import FleetMetrics
from tartarus.fleet.reaper import Reaper
from tartarus.fleet.records import Records
from tartarus.fleet.reports import Reports
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import is_outage, open_state
from tartarus.fleet.wire import Job
from tartarus.node.manager import fingerprint
from tartarus.policy.documents import Quotas
from tartarus.policy.quotas import Usage
from tartarus.queue import Lane, QueueSettings
from tartarus.runtime.types import Backend, SandboxState
from tartarus.scheduling.heat import Heat
from tests.support.fleet import queued_record
from tests.support.redis_server import RedisServer, redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture(params=["redis", "sqlite"])
async def book(
    request: pytest.FixtureRequest, redis: RedisServer, tmp_path: Path
) -> AsyncIterator[SandboxBook]:
    if request.param == "sqlite":
        sqlite = SqliteBook(tmp_path / "fleet.db")
        yield sqlite
        await sqlite.close()
        return
    client = aioredis.Redis.from_url(redis.url)
    # A prefix of the test's own: the server is shared by the module.
    yield RedisBook(client, prefix=f"t{time.monotonic_ns()}:")
    await client.aclose()


async def test_a_key_is_claimed_once_and_bound_by_the_insert(book: SandboxBook) -> None:
    assert await book.claim_key("k", "fp", "sb-1") == (True, None)
    won, earlier = await book.claim_key("k", "fp", "sb-2")
    assert not won and earlier is not None
    assert (earlier.fingerprint, earlier.sandbox_id, earlier.bound) == ("fp", "sb-1", False)
    await book.insert(queued_record("sb-1"), key="k")
    won, earlier = await book.claim_key("k", "other", "sb-3")
    assert not won and earlier == KeyClaim("fp", "sb-1", 0.0)
    assert earlier.bound


async def test_a_failed_create_releases_only_its_own_claim(book: SandboxBook) -> None:
    assert (await book.claim_key("k", "fp", "sb-1"))[0]
    await book.release_key("k", "sb-9")  # not its claim: kept
    assert not (await book.claim_key("k", "fp", "sb-2"))[0]
    await book.release_key("k", "sb-1")
    assert await book.claim_key("k", "fp", "sb-2") == (True, None)
    await book.insert(queued_record("sb-2"), key="k")
    await book.release_key("k", "sb-2")  # bound: kept
    assert not (await book.claim_key("k", "fp", "sb-3"))[0]


async def test_an_insert_whose_claim_was_taken_over_is_refused(
    book: SandboxBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(book_module, "CLAIM_LEASE_S", 0.2)
    assert (await book.claim_key("k", "fp", "sb-1"))[0]
    if isinstance(book, SqliteBook):
        # One process holds every claim it made; a claim lapses only when the process
        # that made it is gone, which a new book over the same file stands for.
        book._creating.clear()
    else:
        await anyio.sleep(0.3)
    won, earlier = await book.claim_key("k", "fp", "sb-2")
    # SQLite's store keeps no sandbox id for a claim that is not bound yet.
    orphan = None if isinstance(book, SqliteBook) else "sb-1"
    assert won and earlier is not None and earlier.sandbox_id == orphan
    with pytest.raises(ClaimLostError) as refused:
        await book.insert(queued_record("sb-1"), key="k")
    assert refused.value.retry_after == 1
    assert await book.get("sb-1") is None
    await book.insert(queued_record("sb-2"), key="k")
    assert (await book.claim_key("k", "fp", "sb-3"))[1] == KeyClaim("fp", "sb-2", 0.0)


async def test_a_renewed_claim_does_not_lapse(
    book: SandboxBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(book_module, "CLAIM_LEASE_S", 0.4)
    assert (await book.claim_key("k", "fp", "sb-1"))[0]
    for _ in range(4):
        await anyio.sleep(0.2)
        await book.renew_key("k", "sb-1")
    assert not (await book.claim_key("k", "fp", "sb-2"))[0]
    await book.insert(queued_record("sb-1"), key="k")


async def test_keys_from_before_leases_read_as_bound(redis: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis.url)
    try:
        book = RedisBook(client, prefix="old:")
        await client.set("old:idem:k", b'["fp","sb-1"]')
        assert await book.claim_key("k", "fp", "sb-2") == (False, KeyClaim("fp", "sb-1", 0.0))
        # Claimed and never bound: its server died long ago (it had no lease to renew).
        await client.set("old:idem:j", b'["fp",null]')
        won, earlier = await book.claim_key("j", "fp", "sb-2")
        assert won and earlier == KeyClaim("fp", None, 1.0)
        await book.insert(queued_record("sb-2"), key="j")
    finally:
        await client.aclose()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(
        st.binary(max_size=64),
        st.lists(st.one_of(st.text(max_size=8), st.none(), st.floats()), max_size=5).map(
            msgspec.json.encode
        ),
    )
)
def test_a_stored_claim_decodes_or_fails_cleanly(raw: bytes) -> None:
    try:
        claim = book_module.decode_claim(raw)
    except msgspec.DecodeError:
        return
    assert claim is None or isinstance(claim, KeyClaim)


async def test_the_book_rides_out_a_redis_restart(tmp_path: Path) -> None:
    # The operator's setting (docs/fleet.md): acknowledged writes survive kill -9.
    with redis_server(tmp_path / "redis", durable=True) as server:
        queues = QueueSettings()
        async with open_state(server.url, lanes=queues, inbox=queues, heartbeat_ttl_s=5.0) as state:
            await state.book.insert(queued_record("sb-1"))
            # Every pooled connection dies with the server; the next calls reconnect.
            down = await anyio.to_thread.run_sync(server.crash_and_restart)
            assert down < 10
            stored = await state.book.get("sb-1")
            assert stored is not None and stored.id == "sb-1"
            assert (await state.book.claim_key("k", "fp", "sb-2"))[0]
            await state.book.insert(queued_record("sb-2"), key="k")
            # Down for good: an outage the server answers with a 503 (not a 500).
            server.process.kill()
            server.process.wait()
            with pytest.raises(Exception) as failed:
                await state.book.get("sb-1")
            assert is_outage(failed.value), repr(failed.value)


async def test_a_late_report_does_not_move_a_record_back(redis: RedisServer) -> None:
    # A node's report of the sandbox being created, retried through an outage, lands
    # after its answer to the work said it runs: the record stays running.
    queues = QueueSettings()
    async with open_state(redis.url, lanes=queues, inbox=queues, heartbeat_ttl_s=5.0) as state:
        metrics = FleetMetrics(state)
        reports = Reports(state, Records(state), ErrorStream(state, metrics), metrics)
        placed = msgspec.structs.replace(queued_record(f"sb-{time.monotonic_ns()}"), node="node-a")
        await state.book.insert(placed)
        created = msgspec.structs.replace(placed, revision=1)
        running = msgspec.structs.replace(placed, revision=2, state=SandboxState.RUNNING)
        await reports.apply("node-a", running)
        await reports.apply("node-a", created)
        stored = await state.book.get(placed.id)
        assert stored is not None and (stored.state, stored.revision) == (
            SandboxState.RUNNING,
            2,
        )
        # Another node's word about it is not taken; a newer one from its own node is.
        stopped = msgspec.structs.replace(running, revision=3, state=SandboxState.STOPPED)
        await reports.apply("node-b", stopped)
        assert (await state.book.get(placed.id)).state is SandboxState.RUNNING  # type: ignore[union-attr]
        await reports.apply("node-a", stopped)
        assert (await state.book.get(placed.id)).state is SandboxState.STOPPED  # type: ignore[union-attr]


async def test_a_sandbox_whose_job_was_lost_is_failed_and_its_share_returned(
    redis: RedisServer,
) -> None:
    # Recorded, then its API server died before queueing it: nothing would ever place it.
    queues = QueueSettings()
    async with open_state(redis.url, lanes=queues, inbox=queues, heartbeat_ttl_s=5.0) as state:
        metrics = FleetMetrics(state)
        records = Records(state)
        settings = FleetSettings()
        reaper = Reaper(state, settings, records, ErrorStream(state, metrics))
        tag = time.monotonic_ns()
        lost = msgspec.structs.replace(queued_record(f"sb-lost-{tag}"), place_by=time.time() - 61)
        queued = msgspec.structs.replace(lost, id=f"sb-queued-{tag}", place_by=time.time())
        placed = msgspec.structs.replace(lost, id=f"sb-placed-{tag}", node="node-a")
        old = queued_record(f"sb-old-{tag}")  # recorded before deadlines were kept
        for r in (lost, queued, placed, old):
            await state.book.insert(r)
        assert (
            await state.quota.hold(
                lost.tenant, lost.id, Usage(template="base", vcpus=1, memory_mib=256), Quotas()
            )
            is None
        )
        assert await reaper.fail_stranded() == 1
        assert await reaper.fail_stranded() == 0  # failed once, counted once
        stored = [await state.book.get(r.id) for r in (lost, queued, placed, old)]
        assert [r.state for r in stored if r is not None] == [
            SandboxState.FAILED,
            SandboxState.CREATED,
            SandboxState.CREATED,
            SandboxState.CREATED,
        ]
        assert lost.id not in (await state.quota.holds()).get(lost.tenant, {})


async def test_a_claim_or_insert_whose_reply_was_lost_is_ours_when_tried_again(
    redis: RedisServer,
) -> None:
    # redis-py resends a command, or a watched transaction starts again, when the
    # connection drops after Redis applied it: the second try must see its own work.
    client = aioredis.Redis.from_url(redis.url)
    try:
        book = RedisBook(client, prefix=f"t{time.monotonic_ns()}:")
        assert await book.claim_key("k", "fp", "sb-1") == (True, None)
        assert await book.claim_key("k", "fp", "sb-1") == (True, None)
        inserted = await book.insert(queued_record("sb-1"), key="k")
        assert await book.insert(inserted, key="k") is inserted
    finally:
        await client.aclose()


async def test_a_retry_queues_the_job_its_dead_server_recorded_but_never_queued(
    redis: RedisServer,
) -> None:
    # An API server recorded the sandbox (binding the key) and died before its job
    # reached a lane. The client's retry with the same key queues it, with a new
    # placement deadline, and the pending copy is forgotten.
    queues = QueueSettings()
    async with open_state(redis.url, lanes=queues, inbox=queues, heartbeat_ttl_s=5.0) as state:
        metrics = FleetMetrics(state)
        settings = FleetSettings(create_timeout_s=0.3)
        intake = Intake(state, settings, Records(state), ErrorStream(state, metrics), metrics)
        caller = msgspec.structs.replace(
            SYSTEM, subject="someone", tenant=f"t{time.monotonic_ns()}"
        )
        request = CreateSandboxRequest(template="base", backend=Backend.JAIL)
        sandbox_id = f"sb-dead-{time.monotonic_ns()}"
        key = f"{caller.tenant}/k"
        job = Job(
            sandbox_id=sandbox_id,
            request=request,
            lane=Lane.MAIN,
            heat=Heat.WARM,
            tenant=caller.tenant,
            owner=caller.subject,
            place_by=time.time() - 5,  # long past, as after a slow restart
        )
        assert (await state.book.claim_key(key, fingerprint(request), sandbox_id))[0]
        recorded = msgspec.structs.replace(
            queued_record(sandbox_id), tenant=caller.tenant, pending_job=msgspec.json.encode(job)
        )
        await state.book.insert(recorded, key=key)

        with pytest.raises(UnavailableError, match="still queued"):
            await intake.create(request, "k", caller)
        message = await state.lanes.get("placer", timeout_s=1.0)
        assert message is not None
        queued = msgspec.json.decode(message.body, type=Job)
        assert queued.sandbox_id == sandbox_id and queued.place_by > time.time()
        stored = await state.book.get(sandbox_id)
        assert stored is not None and stored.pending_job == b""
        assert stored.place_by == pytest.approx(queued.place_by)
        # A second retry finds it queued: no second copy.
        with pytest.raises(UnavailableError, match="still queued"):
            await intake.create(request, "k", caller)
        assert await state.lanes.get("placer", timeout_s=0.2) is None
