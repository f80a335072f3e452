"""The soak and chaos run on a fleet (tests/support/soak.py's load): a durable Redis
(appendonly, appendfsync always: what docs/fleet.md asks of operators), two API servers
over it and three node agents running jails and gVisor sandboxes, clients taking turns
between the API servers. Faults, each once while loaded:

- `api-kill`: kill -9 of an API server, started again on its address and state;
- `agent-kill`: kill -9 of a node agent: its sandboxes end with it (the fleet marks them
  failed when its heartbeats stop), which is a loss the clients see; it is started
  again and joins;
- `redis-kill`: kill -9 of Redis, started again on its files: acknowledged state must
  survive it.

Failures of sandboxes the lost node ran are the fault's, not errors.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis

from tartarus.endpoint import Endpoint
from tartarus.fleet.book import decode_claim
from tartarus.sdk.client import Client
from tests.support.fleet import (
    TOKEN,
    fleet_config,
    nodes,
    reap_leftovers,
    start_agent,
    start_api,
    stop_process,
    wait_for,
)
from tests.support.redis_server import RedisServer, redis_server
from tests.support.server import Server, start_server
from tests.support.soak import (
    Action,
    SoakPlan,
    SoakReport,
    _Run,
    host_state,
    invariants,
    leaks,
    report,
    row_leaks,
    run_load,
)

FLEET_FAULTS = ("redis-kill", "api-kill", "agent-kill")
NODES = ("node-a", "node-b", "node-c")
# The node the `agent-kill` fault takes down.
VICTIM = "node-c"


class _Fleet:
    def __init__(
        self, base: Path, redis: RedisServer, config: Path, backends: tuple[str, ...]
    ) -> None:
        self.base = base
        self.backends = backends
        self.redis = redis
        self.config = config
        self.apis: list[Server] = []
        self.agents: dict[str, Server] = {}

    def urls(self) -> list[str]:
        return [a.tcp_url for a in self.apis if a.tcp_url]

    def start_agent(self, node_id: str) -> None:
        self.agents[node_id] = start_agent(
            self.base / node_id,
            self.urls(),
            node_id,
            "--cpus",
            "16",
            config=self.config,
            backends=self.backends,
        )

    def pids(self) -> set[int]:
        return {p.process.pid for p in (*self.apis, *self.agents.values())} | {
            self.redis.process.pid
        }


async def _api_kill(run: _Run) -> None:
    fleet: _Fleet = run.extra["fleet"]
    api = fleet.apis[0]
    assert api.tcp_url is not None
    host, port = api.tcp_url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    api.process.kill()
    api.process.wait()

    def again() -> Server:
        return start_server(
            fleet.base / "api0",
            "--state",
            fleet.redis.url,
            env=api.env,
            listen=("--tcp", f"{host}:{port}"),
        )

    fleet.apis[0] = await anyio.to_thread.run_sync(again)
    run.faults["api-kill"] = {"down_s": round(time.monotonic() - started, 3)}


async def _agent_kill(run: _Run) -> None:
    fleet: _Fleet = run.extra["fleet"]
    agent = fleet.agents[VICTIM]
    agent.process.kill()
    agent.process.wait()
    run.extra["lost_node"] = VICTIM
    # Its sandboxes went with it (an agent's sandboxes end with it); what it left on the
    # host is reaped when it starts again, after the fleet has seen it gone.
    await anyio.sleep(5)
    await anyio.to_thread.run_sync(fleet.start_agent, VICTIM)
    run.faults["agent-kill"] = {"node": VICTIM}


async def _redis_kill(run: _Run) -> None:
    fleet: _Fleet = run.extra["fleet"]
    down = await anyio.to_thread.run_sync(fleet.redis.crash_and_restart)
    run.faults["redis-kill"] = {"down_s": round(down, 3), "appendfsync": "always"}


FLEET_ACTIONS: dict[str, Action] = {
    "api-kill": _api_kill,
    "agent-kill": _agent_kill,
    "redis-kill": _redis_kill,
}


async def _attribute_node_loss(run: _Run) -> None:
    """Moves the failures of sandboxes the lost node ran from errors to the fault."""
    node = run.extra.get("lost_node")
    if node is None:
        return
    for sandbox_id, kinds in run.failures_of.items():
        info = await run.client.call("GET", f"/v1/sandboxes/{sandbox_id}", dict)
        if info.get("node") != node:
            run.extra.setdefault("unexplained", []).append(
                f"{sandbox_id} on {info.get('node')}: {info.get('state')} "
                f"({info.get('detail')}): {kinds}"
            )
            continue
        for kind in kinds:
            run.errors[kind] -= 1
            run.fault_errors.setdefault("agent-kill", Counter())[kind] += 1
    run.errors = +run.errors  # drops the zero counts
    if elsewhere := run.extra.get("unexplained"):
        # Failures on nodes the fault left alone are errors: say which and how they ended.
        run.faults["agent-kill"]["failures_elsewhere"] = elsewhere[:20]


async def redis_leaks(url: str, prefix: str = "tartarus:") -> list[str]:
    """What a finished run must not leave in the fleet's Redis: node reservations,
    quota holds, live-on-node index entries, idempotency claims never bound, messages
    waiting or in flight in a lane or inbox (the dead letters are kept on purpose)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    out: list[str] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}*"):
            name = key.removeprefix(prefix)
            if name == "res" or name.endswith(":res") or name.startswith("quota:"):
                out += [f"{key}: {field!r}" for field in await client.hkeys(key)]
            elif name.startswith("sb-node:"):
                out += [f"{key}: {member!r}" for member in await client.smembers(key)]
            elif name.startswith("idem:"):
                claim = decode_claim(await client.get(key))
                if claim is not None and not claim.bound:
                    out.append(f"{key}: claimed for {claim.sandbox_id}, never bound")
            elif name.startswith("{q:") and not name.endswith(":dead"):
                waiting = await client.xlen(key)
                out += [f"{key}: {waiting} messages"] if waiting else []
    finally:
        await client.aclose()
    return sorted(out)


async def _settled_redis_leaks(url: str, within_s: float = 15.0) -> list[str]:
    """Redis leaks once the nodes' last reports are in (a reservation goes when the
    node reports its sandbox stopped), or what is still there after `within_s`."""
    deadline = time.monotonic() + within_s
    while (left := await redis_leaks(url)) and time.monotonic() < deadline:  # noqa: ASYNC110 - another process's state
        await anyio.sleep(0.5)
    return left


async def fleet_soak(plan: SoakPlan, base: Path) -> SoakReport:
    """One run on a fleet of its own under `base`; everything is stopped after."""
    before = host_state(base)
    with redis_server(base / "redis", durable=True) as redis:
        config = fleet_config(base / "config", heartbeat_ttl_s=3.0, placement_timeout_s=20.0)
        fleet = _Fleet(base, redis, config, plan.backends)
        clients: list[Client] = []
        logs: list[str] = []
        try:
            for i in range(2):
                fleet.apis.append(start_api(base / f"api{i}", redis.url, config=config))
            for node_id in NODES:
                fleet.start_agent(node_id)
            wait_for(lambda: set(nodes(fleet.apis[0])) == set(NODES), what="three nodes")
            clients = [Client(Endpoint.parse(url), api_key=TOKEN) for url in fleet.urls()]
            run = _Run(plan=plan, base=base, server=fleet.apis[0], clients=clients)
            run.extra["fleet"] = fleet
            seconds = await run_load(run, FLEET_ACTIONS)
            await _attribute_node_loss(run)
            checked: dict[str, Any] = await invariants(
                run, [api.state_dir / "audit.db" for api in fleet.apis]
            )
            in_redis = await _settled_redis_leaks(redis.url)
        finally:
            for client in clients:
                await client.close()
            ours = fleet.pids()
            for agent in fleet.agents.values():
                stop_process(agent)
            for api in fleet.apis:
                stop_process(api)
                logs.append(api.log())
            for node_id in NODES:
                await anyio.to_thread.run_sync(reap_leftovers, base / node_id)
    left = leaks(before, host_state(base), ours)
    left["redis keys"] = in_redis
    left["database rows"] = row_leaks([fleet.agents[n].state_dir / "server.db" for n in NODES])
    return report(run, seconds, checked, left, logs)
