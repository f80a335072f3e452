"""Minos across the fleet: two API servers sharing a real redis-server admit no more of a
tenant's sandboxes than its quota, however the creates race between them, and give the
share back on every path that ends a sandbox (deleted while queued, unschedulable,
never recorded)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import pytest
import redis

from tartarus.fleet.coordinator import Coordinator
from tartarus.fleet.settings import FleetSettings
from tartarus.fleet.state import open_state
from tartarus.node.store import SandboxRecord
from tartarus.policy.documents import Quotas
from tartarus.policy.quotas import Usage
from tartarus.queue import QueueSettings
from tartarus.runtime.types import Backend, Resources, SandboxState
from tests.support.fleet import SANDBOX, call, fleet_config, start_api, stop_process, wait_for
from tests.support.redis_server import redis_server

pytestmark = pytest.mark.timeout(180)

QUOTA = 5
POLICY = f"name: global\nspec:\n  resources: {{max_sandboxes: {QUOTA}}}\n"
HOLDS = "tartarus:quota:default"  # the operator's tenant


def test_two_api_servers_never_admit_past_the_quota(tmp_path: Path) -> None:
    # No node agents: admitted sandboxes wait in the lanes (holding their share) until
    # their placement deadline fails them.
    config = fleet_config(tmp_path / "config", placement_timeout_s=6.0, create_timeout_s=0.5)
    with redis_server(tmp_path / "redis") as server:
        apis = [start_api(tmp_path / f"api{i}", server.url, config=config) for i in range(2)]
        db = redis.Redis(host=server.host, port=server.port)
        try:
            for api in apis:  # each API server keeps its own policy store
                put = call(api, "PUT", "/v1/policies/global", {"document": POLICY})
                assert put.status == 200, put.body

            def create(i: int) -> int:
                return call(apis[i % 2], "POST", "/v1/sandboxes", SANDBOX, timeout=60).status

            with ThreadPoolExecutor(max_workers=24) as pool:
                statuses = list(pool.map(create, range(24)))
            admitted = [s for s in statuses if s != 429]
            assert len(admitted) == QUOTA, statuses
            assert set(admitted) == {503}  # queued: no node to run them (yet)
            assert db.hlen(HOLDS) == QUOTA
            refused = call(apis[1], "POST", "/v1/sandboxes", SANDBOX)
            assert refused.status == 429 and "minos" in refused.json()["detail"]
            # With an idempotency key as well (the SDK's creates carry one), and the key
            # is free again for a create that fits later.
            keyed = {"Idempotency-Key": "over-quota"}
            for _ in range(2):
                refused = call(apis[0], "POST", "/v1/sandboxes", SANDBOX, headers=keyed)
                assert refused.status == 429 and "minos" in refused.json()["detail"]

            # Deleted while queued: its share is back at once, for either server.
            queued = call(apis[0], "GET", "/v1/sandboxes?state=created").json()["items"]
            assert len(queued) == QUOTA
            assert call(apis[1], "DELETE", f"/v1/sandboxes/{queued[0]['id']}").status == 204
            assert db.hlen(HOLDS) == QUOTA - 1
            assert call(apis[0], "POST", "/v1/sandboxes", SANDBOX).status == 503
            assert call(apis[1], "POST", "/v1/sandboxes", SANDBOX).status == 429

            # Unschedulable (no node before the placement deadline): every share is back.
            wait_for(lambda: db.hlen(HOLDS) == 0, timeout_s=30, what="the shares back")
            listed = call(apis[1], "GET", "/v1/sandboxes?state=failed").json()["items"]
            assert len(listed) == QUOTA
            assert call(apis[1], "POST", "/v1/sandboxes", SANDBOX).status == 503
        finally:
            for api in apis:
                stop_process(api)


def test_the_template_s_own_resources_are_what_the_quota_judges(tmp_path: Path) -> None:
    """The base template asks for 128 MiB (base.yaml): a create that names no resources
    fits a 200 MiB quota, as on one host, instead of being judged at the API's 512."""
    config = fleet_config(tmp_path / "config", placement_timeout_s=30.0, create_timeout_s=0.5)
    policy = "name: global\nspec:\n  resources: {max_memory_mib: 200}\n"
    with redis_server(tmp_path / "redis") as server:
        api = start_api(tmp_path / "api", server.url, config=config)
        try:
            assert call(api, "PUT", "/v1/policies/global", {"document": policy}).status == 200
            first = call(api, "POST", "/v1/sandboxes", SANDBOX)
            assert first.status == 503, first.body  # admitted, queued: no node yet
            (queued,) = call(api, "GET", "/v1/sandboxes?state=created").json()["items"]
            assert queued["resources"]["memory_mib"] == 128
            # A second one would hold 256 MiB: past the quota.
            second = call(api, "POST", "/v1/sandboxes", SANDBOX)
            assert second.status == 429 and "minos" in second.json()["detail"], second.body
        finally:
            stop_process(api)


def record(sandbox_id: str, state: SandboxState) -> SandboxRecord:
    return SandboxRecord(
        id=sandbox_id,
        template="base",
        backend=Backend.JAIL,
        state=state,
        created_at=time.time(),
        resources=Resources(),
        tenant="acme",
    )


async def sweep(url: str) -> None:
    async with open_state(
        url, lanes=QueueSettings(), inbox=QueueSettings(), heartbeat_ttl_s=10.0
    ) as state:
        coordinator = Coordinator(state, FleetSettings(), join_token="")
        want = Usage(template="base", vcpus=1.0, memory_mib=256)
        quotas = Quotas(max_sandboxes=3)
        await state.book.insert(record("sb-ended", SandboxState.STOPPED))
        await state.book.insert(record("sb-running", SandboxState.RUNNING))
        # sb-lost: its server died between admitting and recording it.
        for sandbox_id in ("sb-lost", "sb-ended", "sb-running"):
            assert await state.quota.hold("acme", sandbox_id, want, quotas) is None
        refusal = await state.quota.hold("acme", "sb-more", want, quotas)
        assert refusal is not None and "3 of its 3" in refusal
        assert await coordinator.records.settle_quota(grace_s=60.0) == 1  # sb-lost is too new
        assert await coordinator.records.settle_quota(grace_s=0.0) == 1
        assert set((await state.quota.holds())["acme"]) == {"sb-running"}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_sweep_gives_back_shares_of_ended_or_unrecorded_sandboxes(
    tmp_path: Path, kind: str
) -> None:
    if kind == "sqlite":
        anyio.run(sweep, f"sqlite:///{tmp_path / 'fleet.db'}")
        return
    with redis_server(tmp_path / "redis") as server:
        anyio.run(sweep, server.url)
