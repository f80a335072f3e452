"""The HTTP API with real sandboxes: idempotency keys, pagination, exec in every form,
WebSocket exec, clients that vanish mid-stream, hostile file paths, and the state
after a graceful shutdown and after kill -9."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.host.procfs import process_alive
from tests.support.server import (
    Server,
    processes_mentioning,
    require_backend,
    running_server,
    sandbox_base,
    start_server,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def backend() -> str:
    return require_backend()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, backend: str) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("e2e")
    with running_server(base) as s:
        yield s
    assert processes_mentioning(str(base)) == []


def create(server: Server, backend: str, **extra: Any) -> dict[str, Any]:
    r = server.json("POST", "/v1/sandboxes", {"backend": backend, "timeout_s": 120, **extra})
    assert r.status == 201, r.body
    info: dict[str, Any] = r.json()
    return info


def delete(server: Server, sandbox_id: str) -> None:
    assert server.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status == 204


def live_ids(server: Server) -> set[str]:
    r = server.raw("GET", "/v1/sandboxes?state=running&state=created&limit=500")
    return {i["id"] for i in r.json()["items"]}


def test_idempotency_key(server: Server, backend: str) -> None:
    body = {"backend": backend, "timeout_s": 60, "metadata": {"t": "idem"}}
    key = {"Idempotency-Key": "create-once-1", "Content-Type": "application/json"}
    first = server.raw("POST", "/v1/sandboxes", json.dumps(body), key)
    assert first.status == 201
    again = server.raw("POST", "/v1/sandboxes", json.dumps(body), key)
    assert again.status == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    other = dict(body, timeout_s=61)
    clash = server.raw("POST", "/v1/sandboxes", json.dumps(other), key)
    assert clash.status == 409
    assert "different request" in clash.json()["detail"]
    listed = server.raw("GET", "/v1/sandboxes?metadata=t=idem").json()["items"]
    assert [i["id"] for i in listed] == [first.json()["id"]]
    delete(server, first.json()["id"])


def test_template_defaults_fill_what_the_request_leaves_out(server: Server, backend: str) -> None:
    """The base template's own resources (base.yaml) where the request names none."""
    info = create(server, backend)
    assert info["resources"] == {"vcpus": 1.0, "memory_mib": 128, "disk_mib": 256, "pids": 128}
    mine = create(server, backend, resources={"memory_mib": 300})
    assert mine["resources"]["memory_mib"] == 300 and mine["resources"]["pids"] == 128
    delete(server, info["id"])
    delete(server, mine["id"])


def test_pagination(server: Server, backend: str) -> None:
    ids = [create(server, backend, metadata={"batch": "pages"})["id"] for _ in range(5)]
    try:
        seen: list[str] = []
        cursor = ""
        pages = 0
        while True:
            r = server.raw("GET", f"/v1/sandboxes?metadata=batch=pages&limit=2{cursor}")
            page = r.json()
            pages += 1
            seen += [i["id"] for i in page["items"]]
            if page["next_cursor"] is None:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert seen == ids
        assert pages == 3
    finally:
        for sandbox_id in ids:
            delete(server, sandbox_id)


def test_exec_forms(server: Server, backend: str) -> None:
    sb = create(server, backend)["id"]
    try:
        r = server.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": ["sh", "-c", "echo a; exit 4"]})
        assert r.status == 200
        assert (r.json()["stdout"], r.json()["exit_code"]) == ("a\n", 4)
        # A program that does not exist is the request's fault, not a missing sandbox.
        for route in ("exec", "exec/stream"):
            r = server.json("POST", f"/v1/sandboxes/{sb}/{route}", {"cmd": ["/no/such/prog"]})
            assert r.status == 422, r.body
            assert r.json()["type"].endswith("/cannot-start")
        assert server.raw("GET", f"/v1/sandboxes/{sb}").status == 200
        r = server.json("POST", f"/v1/sandboxes/{sb}/exec/stream", {"cmd": "echo x; echo y >&2"})
        events = [json.loads(line) for line in r.body.splitlines()]
        assert events[0]["type"] == "started"
        assert events[-1] == {"type": "exit", "exit": events[-1]["exit"]}
        assert events[-1]["exit"]["code"] == 0
        out = "".join(
            e["data"] for e in events if e["type"] == "output" and e["stream"] == "stdout"
        )
        assert out == "x\n"
        r = server.json(
            "POST",
            f"/v1/sandboxes/{sb}/exec",
            {"cmd": "cat", "background": True, "stdin_open": True},
        )
        assert r.status == 202
        pid = r.json()["pid"]
        assert (
            server.json(
                "POST", f"/v1/sandboxes/{sb}/processes/{pid}/stdin", {"data": "zz", "eof": True}
            ).status
            == 204
        )
        replay = server.raw("GET", f"/v1/sandboxes/{sb}/processes/{pid}/stream")
        lines = [json.loads(x) for x in replay.body.splitlines()]
        assert "".join(e.get("data", "") for e in lines) == "zz"
        assert lines[-1]["exit"]["code"] == 0
        # stdin on a process that was not started with stdin_open
        r = server.json("POST", f"/v1/sandboxes/{sb}/processes/{pid}/stdin", {"data": "late"})
        assert r.status == 409
    finally:
        delete(server, sb)


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client WebSocket frame (RFC 6455), small enough for one header form."""
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    n = len(payload)
    header += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ws_read_frames(sock: socket.socket, until: float) -> list[tuple[int, bytes]]:
    data = b""
    frames: list[tuple[int, bytes]] = []
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
        while len(data) >= 2:
            opcode, n, off = data[0] & 0x0F, data[1] & 0x7F, 2
            if n == 126:
                n, off = int.from_bytes(data[2:4], "big"), 4
            elif n == 127:
                n, off = int.from_bytes(data[2:10], "big"), 10
            if len(data) < off + n:
                break
            frames.append((opcode, data[off : off + n]))
            data = data[off + n :]
            if opcode == 8:
                return frames
    return frames


def _ws_connect(server: Server, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(1)
    sock.connect(str(server.socket_path))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_websocket_exec(server: Server, backend: str) -> None:
    sb = create(server, backend)["id"]
    try:
        sock = _ws_connect(server, f"/v1/sandboxes/{sb}/exec/ws")
        sock.sendall(_ws_frame(1, json.dumps({"cmd": "read x; echo got-$x; exit 9"}).encode()))
        sock.sendall(_ws_frame(2, b"hello\n"))
        frames = _ws_read_frames(sock, time.monotonic() + 60)
        sock.close()
        texts = [json.loads(p) for op, p in frames if op == 1]
        output = b"".join(p[1:] for op, p in frames if op == 2 and p[:1] == b"\x01")
        assert texts[0]["type"] == "started"
        assert texts[-1]["type"] == "exit"
        assert texts[-1]["exit"]["code"] == 9
        assert output == b"got-hello\n"
        # A bad first message is refused with an error frame, and the server lives on.
        sock = _ws_connect(server, f"/v1/sandboxes/{sb}/exec/ws")
        sock.sendall(_ws_frame(1, b'{"cmd": 5}'))
        frames = _ws_read_frames(sock, time.monotonic() + 30)
        sock.close()
        assert json.loads(frames[0][1])["type"] == "error"
        assert server.raw("GET", "/v1/health").status == 200
    finally:
        delete(server, sb)


def test_client_vanishing_mid_stream(server: Server, backend: str) -> None:
    sb = create(server, backend)["id"]
    try:
        body = json.dumps({"cmd": "echo begun; sleep 600"}).encode()
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(30)
        sock.connect(str(server.socket_path))
        sock.sendall(
            f"POST /v1/sandboxes/{sb}/exec/stream HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        seen = b""
        while b"begun" not in seen:
            seen += sock.recv(65536)
        pid = int(seen.split(b'"pid":')[1].split(b"}")[0])
        sock.close()
        # The foreground command dies with its client; the server and sandbox live on.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            procs = server.raw("GET", f"/v1/sandboxes/{sb}/processes").json()["items"]
            if not any(p["pid"] == pid and p["running"] for p in procs):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the streamed command outlived its client")
        # Same for a log follower and a download cut short.
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(server.socket_path))
        sock.sendall(
            f"GET /v1/sandboxes/{sb}/logs?follow=true HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        sock.recv(1024)
        sock.close()
        assert server.raw("GET", "/v1/health").status == 200
        assert server.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "running"
    finally:
        delete(server, sb)


def test_hostile_paths_and_bodies(server: Server, backend: str) -> None:
    sb = create(server, backend)["id"]
    try:
        for path in ["/tmp/../../etc/shadow", "..", "etc/passwd", "/a/./../b"]:
            r = server.raw("GET", f"/v1/sandboxes/{sb}/files?path={path}")
            assert r.status in (400, 422), (path, r.status)
        r = server.raw("PUT", f"/v1/sandboxes/{sb}/files?path=/tmp/../x", b"data")
        assert r.status == 400
        # /etc/passwd inside the sandbox is the sandbox's own, not the host's.
        r = server.raw("GET", f"/v1/sandboxes/{sb}/files?path=/etc/passwd")
        if r.status == 200:
            assert r.body != Path("/etc/passwd").read_bytes()
        for bad in [b"{", b'{"cmd": 1}', b'{"cmd": "x", "shell": true}', b"[]", b"null"]:
            r = server.raw(
                "POST", f"/v1/sandboxes/{sb}/exec", bad, {"Content-Type": "application/json"}
            )
            assert r.status in (400, 422), (bad, r.status)
        r = server.raw(
            "POST",
            f"/v1/sandboxes/{sb}/exec",
            b'{"cmd": "' + b"x" * (3 << 20) + b'"}',
            {"Content-Type": "application/json"},
        )
        assert r.status == 413
        assert server.raw("GET", f"/v1/sandboxes/{sb}").json()["state"] == "running"
    finally:
        delete(server, sb)
    assert sb not in live_ids(server)


@pytest.fixture
def base() -> Iterator[Path]:
    with sandbox_base() as path:
        yield path


def test_graceful_shutdown_stops_sandboxes(base: Path, backend: str) -> None:
    s = start_server(base)
    try:
        sb = create(s, backend)["id"]
        s.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": "sleep 600", "background": True})
    finally:
        assert s.stop(signal.SIGTERM) == 0
    assert processes_mentioning(str(base)) == []
    with running_server(base) as again:
        info = again.raw("GET", f"/v1/sandboxes/{sb}").json()
        assert info["state"] == "stopped"
        assert info["detail"] == "the server shut down"


def test_kill_9_then_restart_reconciles(base: Path, backend: str) -> None:
    """The sandboxes outlive the server and the next one re-attaches to them
    (tests/test_server_restart.py has twenty); one that died meanwhile is reaped."""
    s = start_server(base)
    ids = [create(s, backend)["id"] for _ in range(3)]
    s.json("POST", f"/v1/sandboxes/{ids[0]}/exec", {"cmd": "sleep 600", "background": True})
    s.process.send_signal(signal.SIGKILL)
    s.process.wait(timeout=30)
    gone = ids.pop()
    for pid, _ in processes_mentioning(gone):
        os.kill(pid, signal.SIGKILL)
    with running_server(base) as again:
        info = again.raw("GET", f"/v1/sandboxes/{gone}").json()
        assert info["state"] == "failed" and "reaped on restart" in info["detail"], info
        assert live_ids(again) == set(ids)
        for sandbox_id in ids:
            r = again.json("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": "echo ok"})
            assert r.json()["stdout"] == "ok\n"
            delete(again, sandbox_id)
        again.teardowns_done()
        assert processes_mentioning(str(base)) == [], "a sandbox outlived its delete"
        # And the restarted server makes new ones.
        fresh = create(again, backend)["id"]
        r = again.json("POST", f"/v1/sandboxes/{fresh}/exec", {"cmd": "echo ok"})
        assert r.json()["stdout"] == "ok\n"
        delete(again, fresh)


def test_sequence_numbers_past_64_bits_are_rejected(server: Server, backend: str) -> None:
    """Found by the API fuzzer: `?since=` beyond 64 bits was a 500 (it overflowed on its
    way to the agent); SQLite-backed ones would too."""
    sb = create(server, backend)["id"]
    try:
        for path in (
            f"/v1/sandboxes/{sb}/logs?since={2**64}",
            f"/v1/audit?after={2**64}",
            f"/v1/policies/default?version={2**64}",
        ):
            r = server.raw("GET", path)
            assert r.status == 422, (path, r.body)
        assert server.raw("GET", f"/v1/sandboxes/{sb}/logs?since={2**63 - 1}").status == 200
    finally:
        delete(server, sb)


@pytest.mark.parametrize("kind", ["jail", "gvisor"])
def test_a_sandbox_whose_host_process_is_killed_refuses_work_and_fails(
    server: Server, kind: str, doctor_report: DoctorReport
) -> None:
    # kill -9 of a jail's supervisor leaves the jail's agent unsupervised but still
    # answering: the next exec is refused all the same, and the record fails.
    verdict = doctor_report.backend(kind)
    if not verdict.available:
        pytest.skip(f"{kind}: {verdict.reason}")
    sb = create(server, kind)["id"]
    pids = [pid for pid, _ in processes_mentioning(sb)]
    assert pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    r = server.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": ["echo", "after"]})
    assert r.status == 409, r.body
    assert r.json()["type"].endswith("/sandbox-not-running")
    while time.monotonic() < deadline:
        state = server.raw("GET", f"/v1/sandboxes/{sb}").json()
        if state["state"] != "running":
            break
        time.sleep(0.1)
    assert state["state"] == "failed", state
    delete(server, sb)
