"""Acceptance for many hosts: a real redis-server, two API servers sharing it, three node
agents as separate processes, each in its own network namespace (veth to a bridge),
running every sandbox in a real jail.

- 200 sandboxes scheduled across the agents respecting labels, taints, capacity and
  quarantine;
- a network cut shorter than the heartbeat TTL loses nothing;
- an agent killed mid-run: its queued work is rescheduled or failed with a recorded
  reason, its running sandboxes fail with the reason; nothing is silently lost;
- an API server killed and restarted carries on (the state is in Redis).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tartarus.host.doctor import DoctorReport
from tests.support import netns
from tests.support.fleet import (
    SANDBOX,
    call,
    fleet_config,
    nodes,
    reap_leftovers,
    require_jail,
    start_agent,
    start_api,
    stop_process,
    wait_for,
)
from tests.support.redis_server import RedisServer, redis_server
from tests.support.server import Server, processes_mentioning, start_server

TINY = {"vcpus": 0.05, "memory_mib": 16}
PLAIN_CAPACITY = 110  # node-a's --max-sandboxes


@dataclass
class Fleet:
    redis: RedisServer
    net: netns.Network | None
    apis: list[Server]
    agents: dict[str, Server]
    base: Path
    config: Path

    def host(self) -> str:
        return self.net.host_address if self.net else "127.0.0.1"

    def urls(self) -> list[str]:
        return [a.tcp_url for a in self.apis if a.tcp_url]

    def namespace(self, i: int) -> netns.Namespace | None:
        return self.net.namespaces[i] if self.net else None

    def start_agent(self, i: int, node_id: str, *args: str) -> Server:
        ns = self.namespace(i)
        agent = start_agent(
            self.base / node_id,
            self.urls(),
            node_id,
            *args,
            host=ns.address if ns else "127.0.0.1",
            prefix=ns.prefix if ns else (),
            config=self.config,
        )
        self.agents[node_id] = agent
        return agent


AGENTS = {
    "node-a": ("--label", "zone=a", "--max-sandboxes", str(PLAIN_CAPACITY), "--cpus", "16"),
    "node-b": ("--label", "zone=b", "--taint", "dedicated=ci:NoSchedule", "--cpus", "16"),
    "node-q": ("--pool", "quarantine", "--label", "zone=q", "--cpus", "4"),
}


@pytest.fixture
def fleet(tmp_path: Path, doctor_report: DoctorReport) -> Iterator[Fleet]:
    require_jail(doctor_report)
    why = netns.unavailable()
    print("agents in network namespaces" if why is None else f"agents on loopback: {why}")
    with (
        redis_server(tmp_path / "redis") as redis,
        netns.network(len(AGENTS)) if why is None else contextlib.nullcontext() as net,
    ):
        config = fleet_config(tmp_path / "config", heartbeat_ttl_s=4.0, placement_timeout_s=8.0)
        host = net.host_address if net else "127.0.0.1"
        f = Fleet(redis=redis, net=net, apis=[], agents={}, base=tmp_path, config=config)
        try:
            for i in range(2):
                f.apis.append(start_api(tmp_path / f"api{i}", redis.url, host=host, config=config))
            for i, (node_id, args) in enumerate(AGENTS.items()):
                f.start_agent(i, node_id, *args)
            wait_for(lambda: set(nodes(f.apis[0])) == set(AGENTS), what="three nodes")
            yield f
        finally:
            for agent in f.agents.values():
                stop_process(agent)
            for api in f.apis:
                stop_process(api)
            # What a SIGKILLed agent left behind (its restart reaps it too).
            for node_id in AGENTS:
                reap_leftovers(tmp_path / node_id)
    assert processes_mentioning(str(tmp_path)) == []  # no jail (or agent) leaked


def create(api: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    reply = call(api, "POST", "/v1/sandboxes", {**SANDBOX, "resources": TINY, **body}, timeout=120)
    return reply.status, reply.json()


def all_records(api: Server) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = ""
    while True:
        page = call(api, "GET", "/v1/sandboxes?limit=500" + (f"&cursor={cursor}" if cursor else ""))
        assert page.status == 200, page.body
        items += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if not cursor:
            return items


@pytest.mark.timeout(300)
def test_two_api_servers_three_agents_two_hundred_sandboxes(fleet: Fleet) -> None:
    api0, api1 = fleet.apis
    assert (
        call(api0, "POST", "/v1/quarantine", {"subject": "group:suspect", "reason": "test"}).status
        == 204
    )
    ci = {"tolerations": [{"key": "dedicated", "value": "ci"}]}
    kinds: list[tuple[str, dict[str, Any]]] = (
        [("plain", {})] * 100
        + [("ci", {"placement": ci})] * 60
        + [("zone-b", {"placement": {**ci, "node_selector": {"zone": "b"}}})] * 20
        + [("quarantined", {"placement": {"groups": ["suspect"]}})] * 20
    )
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(
            pool.map(
                lambda i_kind: (i_kind[1][0], *create(fleet.apis[i_kind[0] % 2], i_kind[1][1])),
                enumerate(kinds),
            )
        )
    failures = [(kind, status, body) for kind, status, body in outcomes if status != 201]
    assert not failures, [(kind, status, body["detail"]) for kind, status, body in failures[:3]]
    placed = {kind: [body["node"] for k, _, body in outcomes if k == kind] for kind, _ in kinds}
    assert set(placed["plain"]) == {"node-a"}  # node-b is tainted, node-q is quarantine-only
    assert set(placed["ci"]) <= {"node-a", "node-b"}
    assert set(placed["zone-b"]) == {"node-b"}
    assert set(placed["quarantined"]) == {"node-q"}
    assert sum(n == "node-a" for n in placed["plain"] + placed["ci"]) <= PLAIN_CAPACITY
    print({kind: {n: nodes_.count(n) for n in set(nodes_)} for kind, nodes_ in placed.items()})

    # Either API server answers for any sandbox, and forwards to its node.
    some = next(body for kind, _, body in outcomes if kind == "quarantined")
    ran = call(api1, "POST", f"/v1/sandboxes/{some['id']}/exec", {"cmd": "echo ok"})
    assert ran.status == 200 and ran.json()["stdout"] == "ok\n", ran.body

    # A network cut shorter than the TTL: the node and its sandboxes carry on.
    ns = fleet.namespace(0)
    if ns is not None:
        ns.cut()
        time.sleep(1.5)
        ns.restore()
        plain = next(body for kind, _, body in outcomes if kind == "plain")
        wait_for(
            lambda: (
                call(api0, "POST", f"/v1/sandboxes/{plain['id']}/exec", {"cmd": "true"}).status
                == 200
            ),
            what="node-a to answer again after the cut",
        )
        assert call(api0, "GET", f"/v1/sandboxes/{plain['id']}").json()["state"] == "running"

    # Kill node-b's agent while work is on its way to it.
    burst = [{"placement": ci}] * 30
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(create, fleet.apis[i % 2], b) for i, b in enumerate(burst)]
        time.sleep(0.3)
        fleet.agents["node-b"].process.send_signal(signal.SIGKILL)
        burst_outcomes = [f.result() for f in pending]
    for status, body in burst_outcomes:
        # Every request has an answer: a sandbox, or a problem saying why not.
        assert status in (201, 409, 503), (status, body)
        assert status == 201 or body["detail"]

    def settled() -> list[dict[str, Any]] | None:
        records = all_records(api0)
        moving = [
            r
            for r in records
            if r["state"] == "created" or (r["node"] == "node-b" and r["state"] == "running")
        ]
        return None if moving else records

    records = wait_for(settled, timeout_s=60, what="node-b's work to be rescheduled or failed")
    on_b = [r for r in records if r["node"] == "node-b"]
    assert on_b and all(r["state"] == "failed" and "heartbeats" in r["detail"] for r in on_b)
    for r in records:
        assert r["state"] in ("running", "failed", "stopped"), r
        if r["state"] != "running":
            assert r["detail"], r  # nothing ends without a reason
    lost = call(api0, "GET", "/v1/errors?category=node-lost&limit=1000").json()["items"]
    assert {e["sandbox_id"] for e in lost if e["sandbox_id"]} >= {r["id"] for r in on_b}

    # Kill an API server; start it again on the same address: it carries on.
    url = api0.tcp_url
    assert url is not None
    api0.process.send_signal(signal.SIGKILL)
    api0.process.wait()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    env = dict(api0.env)
    restarted = start_server(
        fleet.base / "api0-again",
        "--state",
        fleet.redis.url,
        env=env,
        listen=("--tcp", f"{host}:{port}"),
    )
    fleet.apis[0] = restarted
    running = [r for r in all_records(restarted) if r["state"] == "running"]
    assert {r["id"] for r in running} == {r["id"] for r in records if r["state"] == "running"}
    probe = next(r for r in running if r["node"] == "node-a")
    ran = call(restarted, "POST", f"/v1/sandboxes/{probe['id']}/exec", {"cmd": "echo again"})
    assert ran.status == 200 and ran.json()["stdout"] == "again\n"
    status, body = create(restarted, {"placement": {"groups": ["suspect"]}})
    assert status == 201 and body["node"] == "node-q", body
    assert call(restarted, "DELETE", f"/v1/sandboxes/{body['id']}").status == 204

    # node-b comes back: it reaps what it left behind and joins again.
    fleet.start_agent(1, "node-b", *AGENTS["node-b"])
    wait_for(lambda: "node-b" in nodes(restarted), what="node-b to rejoin")
