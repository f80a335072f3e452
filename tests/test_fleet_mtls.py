"""Node agents that join by client certificate (mTLS), with real certificates from
`tartarus certs`: the good one joins with no token and runs a sandbox the API server
forwards to (with the key the node gave at its join); an expired certificate and one
from another CA never get in; a certificate speaks for its own node only."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tartarus.auth.certs import CertificateAuthority
from tartarus.auth.tls import client_context
from tartarus.host.doctor import DoctorReport
from tests.support.fleet import (
    SANDBOX,
    TOKEN,
    fleet_config,
    reap_leftovers,
    require_jail,
    start_agent,
    start_api,
    stop_process,
    wait_for,
)
from tests.support.server import Server

pytestmark = pytest.mark.timeout(180)


def certs(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def operator(api: Server, method: str, path: str, payload: Any = None) -> Any:
    """The API server's unix socket: its owner is the operator, no TLS needed."""
    body = None if payload is None else json.dumps(payload)
    reply = api.raw(method, path, body, {"Content-Type": "application/json"}, timeout=120)
    assert reply.status < 300, reply.body
    return reply.json() if reply.body else None


def https(url: str, ctx: ssl.SSLContext, method: str, path: str, token: str = "") -> int:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body="{}", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def agent_files(directory: Path, name: str, ca: Path) -> tuple[str, ...]:
    return (
        "--ca",
        str(ca),
        "--cert",
        str(directory / f"{name}.pem"),
        "--key",
        str(directory / f"{name}.key"),
    )


def test_agents_join_by_certificate_and_bad_ones_are_refused(
    tmp_path: Path, doctor_report: DoctorReport
) -> None:
    require_jail(doctor_report)
    pki, rogue = tmp_path / "pki", tmp_path / "rogue"
    certs("init", "--dir", str(pki), "--server-name", "127.0.0.1", "--agent", "node-1")
    certs("init", "--dir", str(rogue), "--agent", "node-3")
    # Valid from five minutes ago until now: expired by the time it is presented.
    CertificateAuthority.load(pki).issue(
        pki / "agents", "node-2", common_name="node-2", days=0, client=True
    )
    config = fleet_config(tmp_path / "config")
    config.write_text(
        config.read_text() + f'[auth.tls]\ncert = "{pki}/server.pem"\n'
        f'key = "{pki}/server.key"\nclient_ca = "{pki}/ca.pem"\n'
    )
    api = start_api(tmp_path / "api", f"sqlite:///{tmp_path / 'fleet.db'}", config=config)
    agents: list[Server] = []
    try:
        assert api.tcp_url is not None and api.tcp_url.startswith("https://")
        ca = pki / "ca.pem"
        for name, directory in (("node-1", pki / "agents"), ("node-2", pki / "agents")):
            agents.append(
                start_agent(
                    tmp_path / name,
                    [api.tcp_url],
                    name,
                    config=config,
                    credentials=agent_files(directory, name, ca),
                )
            )
        agents.append(
            start_agent(
                tmp_path / "node-3",
                [api.tcp_url],
                "node-3",
                config=config,
                credentials=agent_files(rogue / "agents", "node-3", ca),
            )
        )
        good, expired, foreign = agents

        def joined() -> dict[str, Any]:
            return {n["spec"]["id"]: n for n in operator(api, "GET", "/v1/nodes")["items"]}

        wait_for(lambda: "node-1" in joined(), what="node-1 to join by its certificate")
        # The key API servers use on the node is never listed.
        assert joined()["node-1"]["spec"]["access_key"] == ""
        for refused in (expired, foreign):

            def tried(agent: Server = refused) -> bool:
                return "joining the fleet" in agent.log()

            wait_for(tried, what="a refused join")
        assert "node-2.pem expired at" in expired.log()
        assert "check that its client_ca signed the client certificate" in foreign.log()
        assert set(joined()) == {"node-1"}

        # Work runs on the node; exec is forwarded with the node's own key.
        sandbox = operator(api, "POST", "/v1/sandboxes", {**SANDBOX, "resources": {"vcpus": 0.1}})
        assert sandbox["node"] == "node-1" and sandbox["state"] == "running"
        ran = operator(api, "POST", f"/v1/sandboxes/{sandbox['id']}/exec", {"cmd": "echo hi"})
        assert ran["stdout"] == "hi\n"
        # The node joined without the fleet's token, so that token opens nothing on it
        # (its API serves https too, with a certificate from the same CA).
        assert good.tcp_url is not None and good.tcp_url.startswith("https://")
        assert https(good.tcp_url, client_context(ca), "GET", "/v1/sandboxes", TOKEN) == 401

        # node-1's certificate speaks for node-1 only.
        mine = client_context(ca, pki / "agents/node-1.pem", pki / "agents/node-1.key")
        assert https(api.tcp_url, mine, "POST", "/v1/nodes/node-9/heartbeat") == 403
        assert https(api.tcp_url, mine, "GET", "/v1/sandboxes") == 403
        # Without a certificate or token: refused.
        assert https(api.tcp_url, client_context(ca), "GET", "/v1/nodes") == 401
    finally:
        for agent in agents:
            stop_process(agent)
        stop_process(api)
        for name in ("node-1", "node-2", "node-3"):
            reap_leftovers(tmp_path / name)
