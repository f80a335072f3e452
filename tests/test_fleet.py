"""The fleet end to end on one host: an API server over SQLite state, node agents as
separate processes, sandboxes (real jails) placed, forwarded, lost and enforced."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tartarus.host.doctor import DoctorReport
from tartarus.scheduling.nodes import PlacementRules, Toleration
from tartarus.sdk import sandbox as sdk_sandbox
from tartarus.sync import Sandbox
from tests.support.fleet import (
    HOG,
    SANDBOX,
    TOKEN,
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
from tests.support.server import Server

pytestmark = pytest.mark.timeout(180)

# Node agents' policy: warn at half the memory limit, kill at 70 % (below the kernel's own
# OOM kill at 100 %, so the policy acts first).
LIMITS = {
    "memory": [{"share": 0.5, "action": "warn"}, {"share": 0.7, "action": "kill"}],
    "cpu": [],
    "interval_s": 0.5,
}


@pytest.fixture
def api(tmp_path: Path, doctor_report: DoctorReport) -> Iterator[Server]:
    require_jail(doctor_report)
    config = fleet_config(tmp_path / "config", limits=LIMITS)
    server = start_api(tmp_path / "api", f"sqlite:///{tmp_path / 'fleet.db'}", config=config)
    try:
        yield server
    finally:
        stop_process(server)


def create(api: Server, **body: object) -> dict[str, object]:
    reply = call(
        api,
        "POST",
        "/v1/sandboxes",
        {**SANDBOX, "resources": {"vcpus": 0.25, "memory_mib": 64}, **body},
    )
    assert reply.status == 201, reply.body
    result: dict[str, object] = reply.json()
    return result


def test_sandboxes_are_placed_by_labels_and_taints_and_forwarded(
    api: Server, tmp_path: Path
) -> None:
    assert api.tcp_url is not None
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", "--label", "zone=a", "--cpus", "2")
    b = start_agent(
        tmp_path / "b", [api.tcp_url], "node-b", "--label", "zone=b", "--taint", "gpu=yes"
    )
    try:
        wait_for(lambda: set(nodes(api)) == {"node-a", "node-b"}, what="both nodes")
        plain = create(api)
        assert plain["node"] == "node-a"  # node-b's taint is not tolerated
        assert plain["state"] == "running"
        gpu = create(
            api,
            placement={"node_selector": {"zone": "b"}, "tolerations": [{"key": "gpu"}]},
        )
        assert gpu["node"] == "node-b"
        refused = call(
            api,
            "POST",
            "/v1/sandboxes",
            {**SANDBOX, "placement": {"node_selector": {"zone": "mars"}}},
        )
        assert refused.status == 503, refused.body
        assert "label zone=mars missing" in refused.json()["detail"]
        # The SDK asks for a placement the same way.
        with Sandbox.create(
            placement=PlacementRules(
                node_selector={"zone": "b"}, tolerations=[Toleration(key="gpu", value="yes")]
            ),
            backend="jail",
            vcpus=0.25,
            memory_mib=64,
            url=api.tcp_url,
            api_key=TOKEN,
        ) as sdk_sandbox:
            assert sdk_sandbox.info.node == "node-b"
            assert sdk_sandbox.commands.run("echo from-sdk").stdout == "from-sdk\n"
        # Exec goes to the node that runs the sandbox.
        ran = call(api, "POST", f"/v1/sandboxes/{plain['id']}/exec", {"cmd": "echo hi"})
        assert ran.status == 200, ran.body
        assert ran.json()["stdout"] == "hi\n"
        # Streams and WebSockets are relayed as they come.
        streamed = call(
            api, "POST", f"/v1/sandboxes/{plain['id']}/exec/stream", {"cmd": "echo streamed"}
        )
        lines = [json.loads(line) for line in streamed.body.splitlines()]
        assert [e["type"] for e in lines] == ["started", "output", "exit"]
        assert lines[1]["data"] == "streamed\n"
        assert anyio.run(websocket_exec, api, str(plain["id"])) == b"over ws\n"
        listed = call(api, "GET", "/v1/sandboxes?state=running").json()["items"]
        assert {s["id"] for s in listed} == {plain["id"], gpu["id"]}
        assert call(api, "DELETE", f"/v1/sandboxes/{plain['id']}").status == 204
        got = call(api, "GET", f"/v1/sandboxes/{plain['id']}").json()
        assert got["state"] == "stopped"
        # The failed request is in the dead letters with its reason.
        queue = call(api, "GET", "/v1/queue").json()
        assert any("zone=mars" in d["reason"] for d in queue["dead_letters"])
        errors = call(api, "GET", "/v1/errors?category=scheduling").json()["items"]
        assert any("zone=mars" in e["message"] for e in errors)
        metrics = call(api, "GET", "/metrics")
        assert b"tartarus_queue_depth" in metrics.body
    finally:
        stop_process(a)
        stop_process(b)


async def websocket_exec(api: Server, sandbox_id: str) -> bytes:
    assert api.tcp_url is not None
    output = b""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session,
        session.ws_connect(f"{api.tcp_url}/v1/sandboxes/{sandbox_id}/exec/ws") as ws,
    ):
        await ws.send_str(json.dumps({"cmd": "echo over ws"}))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                output += msg.data[1:]
            elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "exit":
                break
    return output


def test_a_killed_agent_fails_its_sandboxes_with_the_reason(api: Server, tmp_path: Path) -> None:
    assert api.tcp_url is not None
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=api.extra["config"])
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        sandbox = create(api)
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()

        def failed() -> bool:
            got = call(api, "GET", f"/v1/sandboxes/{sandbox['id']}").json()
            return bool(got["state"] == "failed" and "heartbeats" in got["detail"])

        wait_for(failed, what="the sandbox to be failed with its node")
        assert "node-a" not in nodes(api)
        lost = call(api, "GET", "/v1/errors?category=node-lost").json()["items"]
        assert any(e["sandbox_id"] == sandbox["id"] for e in lost)
    finally:
        stop_process(a)
        reap_leftovers(tmp_path / "a")


def test_timeout_kills_within_a_second_and_is_an_event(api: Server, tmp_path: Path) -> None:
    assert api.tcp_url is not None
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=api.extra["config"])
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        sandbox = create(api, timeout_s=1)

        def ended() -> dict[str, object] | None:
            got: dict[str, object] = call(api, "GET", f"/v1/sandboxes/{sandbox['id']}").json()
            return got if got["state"] != "running" else None

        got = wait_for(ended, what="the timeout")
        assert got["state"] == "stopped" and got["detail"] == "timed out"
        events = wait_for(
            lambda: call(api, "GET", f"/v1/events?sandbox={sandbox['id']}").json()["items"],
            what="the Alecto event",
        )
        assert events[0]["fury"] == "timeout" and events[0]["action"] == "kill"
        assert events[0]["value"] < 1.0  # seconds past the deadline
    finally:
        stop_process(a)


def test_memory_hog_is_killed_per_policy(api: Server, tmp_path: Path) -> None:
    assert api.tcp_url is not None
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=api.extra["config"])
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        sandbox = create(api, resources={"vcpus": 0.5, "memory_mib": 64})
        # 52 MiB of its 64 MiB: past the policy's kill at 70 %, short of the kernel's limit.
        hog = {"cmd": HOG.format(mib=52), "background": True}
        assert call(api, "POST", f"/v1/sandboxes/{sandbox['id']}/exec", hog).status == 202

        def killed() -> dict[str, object] | None:
            got: dict[str, object] = call(api, "GET", f"/v1/sandboxes/{sandbox['id']}").json()
            return got if got["state"] == "failed" else None

        got = wait_for(killed, what="Tisiphone's kill")
        assert "killed by Tisiphone (kill): memory at" in str(got["detail"])
        events = wait_for(
            lambda: call(api, "GET", f"/v1/events?sandbox={sandbox['id']}").json()["items"],
            what="Tisiphone's event",
        )
        assert ("resource-limit", "kill") in {(e["fury"], e["action"]) for e in events}
    finally:
        stop_process(a)


def test_hog_past_its_limit_is_oom_killed_and_reported(api: Server, tmp_path: Path) -> None:
    """With no rule that kills, the kernel enforces the jail's memory limit: the hog is
    OOM killed (the exec says so), the sandbox carries on, and Tisiphone records it."""
    assert api.tcp_url is not None
    warn_only = {"memory": [{"share": 0.5, "action": "warn"}], "cpu": [], "interval_s": 0.5}
    config = fleet_config(tmp_path / "warn-only", limits=warn_only)
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=config)
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        sandbox = create(api, resources={"vcpus": 0.5, "memory_mib": 64})
        ran = call(api, "POST", f"/v1/sandboxes/{sandbox['id']}/exec", {"cmd": HOG.format(mib=96)})
        assert ran.status == 200, ran.body
        assert ran.json()["oom_killed"] is True
        after = call(api, "POST", f"/v1/sandboxes/{sandbox['id']}/exec", {"cmd": "echo alive"})
        assert after.json()["stdout"] == "alive\n"

        def oom_event() -> list[dict[str, object]]:
            items = call(api, "GET", f"/v1/events?sandbox={sandbox['id']}").json()["items"]
            return [e for e in items if (e["fury"], e["action"]) == ("resource-limit", "oom-kill")]

        (event,) = wait_for(oom_event, what="the oom-kill event")
        assert "killed 1 process(es) at the memory limit (64 MiB)" in str(event["detail"])
        assert call(api, "GET", f"/v1/sandboxes/{sandbox['id']}").json()["state"] == "running"
    finally:
        stop_process(a)


def test_draining_agent_leaves_and_its_queued_work_goes_elsewhere(
    api: Server, tmp_path: Path
) -> None:
    assert api.tcp_url is not None
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=api.extra["config"])
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        sandbox = create(api)
        a.process.send_signal(signal.SIGTERM)
        assert a.process.wait(timeout=60) == 0
        got = call(api, "GET", f"/v1/sandboxes/{sandbox['id']}").json()
        assert got["state"] in ("stopped", "failed")
        assert "node-a" not in nodes(api)
        started = time.monotonic()
        refused = call(api, "POST", "/v1/sandboxes", SANDBOX)
        assert refused.status == 503 and "tartarus agent --join" in refused.json()["detail"]
        assert time.monotonic() - started < 60
    finally:
        stop_process(a)


def enqueued(api: Server, lane: str) -> float:
    text = call(api, "GET", "/metrics").body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tartarus_queue_enqueued_total" and sample.labels["lane"] == lane:
                return float(sample.value)
    return 0.0


def test_heat_class_learns_from_history(api: Server, tmp_path: Path) -> None:
    """A cold request (0.25 vCPU, 64 MiB: the swift lane) whose template's sandboxes
    have used most of their memory is one class hotter next time: warm, the main lane."""
    assert api.tcp_url is not None
    warn = {"memory": [{"share": 0.8, "action": "warn"}], "cpu": [], "interval_s": 0.5}
    config = fleet_config(tmp_path / "warn", limits=warn)
    a = start_agent(tmp_path / "a", [api.tcp_url], "node-a", config=config)
    try:
        wait_for(lambda: "node-a" in nodes(api), what="node-a")
        first = create(api)
        assert (enqueued(api, "swift"), enqueued(api, "main")) == (1, 0)
        hog = {"cmd": HOG.format(mib=56), "background": True}
        assert call(api, "POST", f"/v1/sandboxes/{first['id']}/exec", hog).status == 202
        # Tisiphone's warning says a sample saw at least 80 % of the limit.
        wait_for(
            lambda: call(api, "GET", f"/v1/events?sandbox={first['id']}").json()["items"],
            what="a sample past 80 %",
        )
        assert call(api, "DELETE", f"/v1/sandboxes/{first['id']}").status == 204

        def hotter() -> bool:
            got = create(api)
            assert call(api, "DELETE", f"/v1/sandboxes/{got['id']}").status == 204
            return enqueued(api, "main") == 1

        wait_for(hotter, what="the history to make the next one warm")
    finally:
        stop_process(a)


def test_a_create_still_queued_past_the_servers_wait_is_followed_until_it_starts(
    tmp_path: Path, doctor_report: DoctorReport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fleet answers 503 still-queued (Retry-After 5) when its wait for a node ends;
    # the SDK keeps asking with the same key, past its budget for transient failures,
    # because the sandbox is accepted. The one node is full until its sandbox goes.
    require_jail(doctor_report)
    monkeypatch.setattr(sdk_sandbox, "CREATE_RETRY_S", 2.0)
    config = fleet_config(tmp_path / "config", create_timeout_s=1.0, placement_timeout_s=60.0)
    api = start_api(tmp_path / "api", f"sqlite:///{tmp_path / 'fleet.db'}", config=config)
    assert api.tcp_url is not None
    agent = start_agent(tmp_path / "a", [api.tcp_url], "node-a", "--cpus", "1")
    try:
        wait_for(lambda: set(nodes(api)) == {"node-a"}, what="the node")
        whole_node = {"resources": {"vcpus": 1, "memory_mib": 64}}
        first = create(api, **whole_node)
        queued = call(api, "POST", "/v1/sandboxes", {**SANDBOX, **whole_node})
        assert queued.status == 503, queued.body
        assert queued.json()["type"].endswith("/still-queued")
        (waiting,) = call(api, "GET", "/v1/sandboxes?state=created").json()["items"]
        assert call(api, "DELETE", f"/v1/sandboxes/{waiting['id']}").status == 204

        def free_the_node() -> None:
            time.sleep(4)
            assert call(api, "DELETE", f"/v1/sandboxes/{first['id']}").status == 204

        with ThreadPoolExecutor(1) as pool:
            freed = pool.submit(free_the_node)
            with Sandbox.create(
                backend="jail", vcpus=1, memory_mib=64, url=api.tcp_url, api_key=TOKEN
            ) as sandbox:
                assert sandbox.info.node == "node-a"
                assert sandbox.commands.run("echo started").stdout == "started\n"
            freed.result()
    finally:
        for process in (agent, api):
            stop_process(process)
