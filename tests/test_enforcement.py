"""Erinyes and Cocytus: Tisiphone's actions on real jails (the base template, busybox),
Megaera's escalation, and the event/error logs on SQLite and Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest
import redis.asyncio as aioredis

from tartarus.api.types import CreateSandboxRequest, ResourcesBody
from tartarus.auth.principal import SYSTEM
from tartarus.config import Settings
from tartarus.enforcement.limits import LimitEnforcer, triggered
from tartarus.enforcement.log import RedisLog, SqliteLog
from tartarus.enforcement.records import (
    Action,
    EnforcementEvent,
    ErrorCategory,
    ErrorRecord,
    Fury,
    LimitPolicy,
    LimitRule,
    PeakUse,
)
from tartarus.enforcement.violations import QUARANTINE_AFTER, escalate, violation
from tartarus.host.doctor import DoctorReport
from tartarus.node.manager import SandboxManager
from tartarus.node.provider import HostRuntimes
from tartarus.node.store import Store
from tartarus.paths import default_cache_dir
from tartarus.runtime.types import Backend, ExecRequest, SandboxState
from tests.support.fleet import HOG, require_jail
from tests.support.redis_server import RedisServer
from tests.support.server import short_dir

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Events:
    def __init__(self) -> None:
        self.items: list[EnforcementEvent] = []
        self.peaks: list[PeakUse] = []

    def event(self, event: EnforcementEvent) -> None:
        self.items.append(event)

    def peak(self, peak: PeakUse) -> None:
        self.peaks.append(peak)


@pytest.fixture
async def manager(doctor_report: DoctorReport) -> AsyncIterator[SandboxManager]:
    require_jail(doctor_report)
    with short_dir() as base:
        settings = Settings(
            cache_dir=default_cache_dir(), state_dir=base / "state", runtime_dir=base / "run"
        )
        store = Store(base / "state.db")
        provider = HostRuntimes(settings, only=[Backend.JAIL])
        async with SandboxManager(store, provider, timeout_grace_s=0).running() as m:
            yield m
        store.close()
        assert await provider.reap_all() == set()  # the manager left no jail behind


async def sandbox_running(manager: SandboxManager, command: str, memory_mib: int = 64) -> str:
    record, _ = await manager.create(
        CreateSandboxRequest(
            backend=Backend.JAIL,
            resources=ResourcesBody(vcpus=0.5, memory_mib=memory_mib),
        ),
        caller=msgspec.structs.replace(SYSTEM, tenant="greedy"),
    )
    live = manager.live(record.id)
    execution = await live.sandbox.exec(ExecRequest(shell=command, background=True))
    live.executions[execution.pid] = execution
    return record.id


SPIN = "while :; do :; done"


async def watch_until(
    enforcer: LimitEnforcer, manager: SandboxManager, sandbox_id: str, done: object
) -> None:
    with anyio.fail_after(30):
        while True:
            live = manager.live_sandboxes()
            for sandbox in live:
                if sandbox.record.id == sandbox_id:
                    await enforcer.check(sandbox)
            if done():  # type: ignore[operator]
                return
            await anyio.sleep(enforcer.policy.interval_s)


def test_the_strongest_rule_reached_wins() -> None:
    rules = [LimitRule(share=0.5, action=Action.WARN), LimitRule(share=0.9, action=Action.KILL)]
    assert triggered(rules, 0.4) is None
    assert triggered(rules, 0.6) == rules[0]
    assert triggered(rules, 0.95) == rules[1]


async def test_memory_hog_warned_then_killed(manager: SandboxManager) -> None:
    sink = Events()
    policy = LimitPolicy(
        memory=[LimitRule(share=0.2, action=Action.WARN), LimitRule(share=0.5, action=Action.KILL)],
        cpu=[],
        interval_s=0.2,
    )
    enforcer = LimitEnforcer(manager, policy, sink)
    sandbox_id = await sandbox_running(manager, HOG.format(mib=40))
    await watch_until(
        enforcer,
        manager,
        sandbox_id,
        lambda: manager.record(sandbox_id).state is SandboxState.FAILED,
    )
    record = manager.record(sandbox_id)
    assert record.detail.startswith("killed by Tisiphone (kill): memory at")
    actions = [(e.fury, e.action) for e in sink.items]
    assert actions[-1] == (Fury.RESOURCE_LIMIT, Action.KILL)
    assert sink.items[-1].tenant == "greedy" and sink.items[-1].value >= 0.5
    # Each rule acts once per sandbox.
    assert len(actions) == len(set(actions))


async def test_quarantine_action_kills_and_names_the_tenant(manager: SandboxManager) -> None:
    sink = Events()
    policy = LimitPolicy(
        memory=[LimitRule(share=0.3, action=Action.QUARANTINE)], cpu=[], interval_s=0.2
    )
    enforcer = LimitEnforcer(manager, policy, sink)
    sandbox_id = await sandbox_running(manager, HOG.format(mib=40))
    await watch_until(
        enforcer,
        manager,
        sandbox_id,
        lambda: manager.record(sandbox_id).state is SandboxState.FAILED,
    )
    (event,) = sink.items
    assert (event.action, event.tenant) == (Action.QUARANTINE, "greedy")


async def test_throttle_on_a_backend_that_cannot_says_so(manager: SandboxManager) -> None:
    sink = Events()
    policy = LimitPolicy(
        memory=[], cpu=[LimitRule(share=0.3, action=Action.THROTTLE)], interval_s=0.5
    )
    enforcer = LimitEnforcer(manager, policy, sink)
    sandbox_id = await sandbox_running(manager, SPIN)
    await watch_until(enforcer, manager, sandbox_id, lambda: bool(sink.items))
    (event,) = sink.items
    assert event.action is Action.THROTTLE and "cannot throttle, so only warned" in event.detail
    assert manager.record(sandbox_id).state is SandboxState.RUNNING
    await manager.delete(sandbox_id)


async def test_peak_use_is_reported_when_the_sandbox_ends(manager: SandboxManager) -> None:
    sink = Events()
    policy = LimitPolicy(memory=[LimitRule(share=0.5, action=Action.WARN)], cpu=[], interval_s=0.2)
    enforcer = LimitEnforcer(manager, policy, sink)
    sandbox_id = await sandbox_running(manager, HOG.format(mib=40))
    await watch_until(enforcer, manager, sandbox_id, lambda: bool(sink.items))
    assert sink.peaks == []  # reported when the sandbox ends, not before
    await manager.delete(sandbox_id)
    await enforcer.watch_once()
    (peak,) = sink.peaks
    assert (peak.sandbox_id, peak.template, peak.tenant) == (sandbox_id, "base", "greedy")
    assert peak.memory_share >= 0.5
    await enforcer.watch_once()
    assert len(sink.peaks) == 1  # once


def test_megaera_quarantines_a_repeat_offender() -> None:
    events = [violation(f"sb-{i:016x}", "mallory", "egress to 10.0.0.1") for i in range(3)]
    assert escalate(events[:2], "mallory") is None
    escalation = escalate(events, "mallory")
    assert escalation is not None and escalation.action is Action.QUARANTINE
    assert f"{QUARANTINE_AFTER} policy violations" in escalation.detail
    assert escalate(events, "") is None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("alecto", Fury.TIMEOUT),
        ("tisiphone", Fury.RESOURCE_LIMIT),
        ("megaera", Fury.POLICY_VIOLATION),
    ],
)
def test_deprecated_fury_values_are_read_as_the_new_ones(old: str, new: Fury) -> None:
    # An older node's report or an event stored by an older version still decodes ...
    raw = msgspec.json.encode(
        {"fury": old, "action": "record", "sandbox_id": "sb-1", "detail": "d", "tenant": "t"}
    )
    event = msgspec.json.decode(raw, type=EnforcementEvent)
    assert event.fury is new
    assert Fury(old) is new
    # ... and is written back with the new value only.
    assert msgspec.json.decode(msgspec.json.encode(event))["fury"] == new.value
    assert old not in msgspec.json.schema(EnforcementEvent)["$defs"]["Fury"]["enum"]


def test_new_fury_values_say_the_job() -> None:
    assert [f.value for f in Fury] == ["timeout", "resource-limit", "policy-violation"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"fury": "nemesis", "action": "kill", "sandbox_id": "s", "detail": "d"}',
            type=EnforcementEvent,
        )


def test_violations_stored_under_the_old_value_still_count() -> None:
    old = msgspec.json.encode(
        [
            {
                "fury": "megaera",
                "action": "record",
                "sandbox_id": f"sb-{i}",
                "detail": "x",
                "tenant": "mallory",
            }
            for i in range(QUARANTINE_AFTER)
        ]
    )
    events = msgspec.json.decode(old, type=list[EnforcementEvent])
    escalation = escalate(events, "mallory")
    assert escalation is not None and escalation.fury is Fury.POLICY_VIOLATION


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_error_log_query_and_purge(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    client: aioredis.Redis | None = None
    log: SqliteLog[ErrorRecord] | RedisLog[ErrorRecord]
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis")
        client = aioredis.Redis.from_url(server.url)
        log = RedisLog(client, f"errors-{tmp_path.name}", ErrorRecord)
    else:
        log = SqliteLog(tmp_path / "log.db", "errors", ErrorRecord)
    try:
        first = await log.append(
            ErrorRecord(category=ErrorCategory.START, message="no rootfs", sandbox_id="sb-1")
        )
        await log.append(
            ErrorRecord(category=ErrorCategory.NODE_LOST, message="gone", node_id="node-a")
        )
        assert first
        newest_first = await log.query()
        assert [r.message for r in newest_first] == ["gone", "no rootfs"]
        assert [r.message for r in await log.query({"node_id": "node-a"})] == ["gone"]
        assert [r.id for r in await log.query({"category": "start"})] == [first]
        assert await log.query(since=time.time() + 60) == []
        await anyio.sleep(0.01)
        assert await log.purge(time.time()) == 2
        assert await log.query() == []
    finally:
        await log.close()
        if client is not None:
            await client.aclose()
