"""Inbound ports through a real `tartarus serve`: a server inside a jail and a gVisor
sandbox (the `python` template's python3), reached over HTTP and WebSocket by the URL
`get_host` / `tartarus port` gives, with the API's credentials, which never reach the
sandbox. Traffic stays on loopback and the sandboxes' links."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import anyio
import pytest

from tartarus.endpoint import Endpoint
from tartarus.host.doctor import DoctorReport
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox
from tests.conftest import require_root
from tests.support.images import shared_template
from tests.support.server import Server, cli, running_server, server_env

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

KEY = "ports-test-key-0123456789"
PORT = 8000

# An HTTP server that answers GET with what it was sent (path, headers) as JSON, POST
# with the body's length and sha256, and `GET /ws` as a WebSocket echo (RFC 6455, by
# hand: the template has no websocket library).
SERVER = r"""
import base64, hashlib, http.server, json, struct, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, kind="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "a=1")
        self.send_header("Set-Cookie", "b=2")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        seen = {"path": self.path, "headers": dict(self.headers.items())}
        self.answer(200, json.dumps(seen).encode())

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        done = {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.answer(201, json.dumps(done).encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, size = head[0] & 0x0F, head[1] & 0x7F
            if size == 126:
                size = struct.unpack(">H", self.rfile.read(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4)
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(size)))
            if opcode == 8:
                self.wfile.write(b"\x88\x00")
                return
            reply = data.upper() if opcode == 1 else data[::-1]
            n = len(reply)
            length = bytes([n]) if n < 126 else b"\x7e" + struct.pack(">H", n)
            self.wfile.write(bytes([0x80 | opcode]) + length + reply)
            self.wfile.flush()

http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require_root()
    shared_template("python", ext4=False)  # built once per machine
    base = tmp_path_factory.mktemp("ports")
    with running_server(base, env=server_env(base, TARTARUS_API_KEY=KEY)) as srv:
        yield srv


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    assert server.tcp_url is not None
    async with Client(Endpoint.parse(server.tcp_url), api_key=KEY) as c:
        yield c


def backends(doctor_report: DoctorReport) -> list[str]:
    return [b for b in ("jail", "gvisor") if doctor_report.backend(b).available]


@pytest.fixture(params=["jail", "gvisor"])
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> str:
    verdict = doctor_report.backend(request.param)
    if not verdict.available:
        pytest.skip(f"{request.param} cannot run here: {verdict.reason}")
    return str(request.param)


async def serving(client: Client, backend: str) -> Sandbox:
    sb = await Sandbox.create(
        template="python", backend=backend, network=True, trusted=True, client=client
    )
    await sb.files.write("/tmp/server.py", SERVER)
    await sb.commands.run(f"python3 /tmp/server.py {PORT}", background=True)
    return sb


async def wait_for(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(url) as r:
            if r.status != 502:
                return
        await anyio.sleep(0.2)
    raise AssertionError(f"{url} never answered")


async def test_http_and_websocket_reach_the_sandbox_with_our_credentials_kept(
    client: Client, backend: str
) -> None:
    sb = await serving(client, backend)
    try:
        url = await sb.get_host(PORT)
        assert url.endswith(f"/v1/sandboxes/{sb.id}/ports/{PORT}/proxy/")
        auth = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession(headers=auth, auto_decompress=False) as session:
            await wait_for(session, url)
            async with session.get(url + "some/path?x=1&y=2", headers={"X-Mine": "v"}) as r:
                assert r.status == 200
                assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"]
                seen = await r.json()
            assert seen["path"] == "/some/path?x=1&y=2"
            headers = {k.lower(): v for k, v in seen["headers"].items()}
            assert "authorization" not in headers  # the API key stays with us
            assert headers["x-mine"] == "v"
            assert headers["x-forwarded-prefix"] == f"/v1/sandboxes/{sb.id}/ports/{PORT}/proxy"
            # A body larger than the API's JSON limit streams through.
            body = bytes(range(256)) * (12 << 12)
            async with session.post(url + "upload", data=body) as r:
                assert r.status == 201
                assert await r.json() == {
                    "length": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                }
            async with session.ws_connect(url + "ws") as ws:
                await ws.send_str("hello")
                assert (await ws.receive_str(timeout=10)) == "HELLO"
                await ws.send_bytes(b"\x01\x02\x03")
                assert (await ws.receive_bytes(timeout=10)) == b"\x03\x02\x01"
        async with aiohttp.ClientSession() as anonymous, anonymous.get(url) as r:
            assert r.status == 401
    finally:
        await sb.kill()


async def test_clear_errors_for_what_cannot_be_reached(client: Client, backend: str) -> None:
    isolated = await Sandbox.create(template="base", backend=backend, client=client)
    served = await Sandbox.create(
        template="base", backend=backend, network=True, trusted=True, client=client
    )
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        base = client.endpoint.base_url
        async with aiohttp.ClientSession(headers=auth) as session:
            path = f"/v1/sandboxes/{isolated.id}/ports/{PORT}"
            async with session.get(base + path) as r:
                assert r.status == 409
                problem = await r.json()
                assert problem["type"].endswith("no-network"), problem
                assert "network" in problem["detail"]
            for bad in ("0", "65536", "http"):
                async with session.get(f"{base}/v1/sandboxes/{served.id}/ports/{bad}") as r:
                    assert r.status == 404, bad
            # Nothing listens there.
            proxied = f"{base}/v1/sandboxes/{served.id}/ports/9/proxy/"
            async with session.get(proxied) as r:
                assert r.status == 502
                assert "nothing answers on port 9" in (await r.json())["detail"]
    finally:
        await isolated.kill()
        await served.kill()


def test_the_cli_prints_the_url(server: Server, doctor_report: DoctorReport) -> None:
    """`tartarus port SANDBOX PORT` as a user types it, and with --json."""
    if not backends(doctor_report):
        pytest.skip("neither the jail nor gvisor can run here (doctor)")

    def tartarus(*args: str) -> subprocess.CompletedProcess[str]:
        done = cli(server, *args, api_key=KEY)
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )

    body = {"template": "base", "backend": backends(doctor_report)[0], "network": True,
            "trust": "trusted"}  # fmt: skip
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    created = server.raw("POST", "/v1/sandboxes", json.dumps(body), auth, tcp=True)
    assert created.status == 201, created.body
    sandbox_id = created.json()["id"]
    try:
        human = tartarus("port", sandbox_id, "8080")
        assert human.returncode == 0, human.stderr
        assert human.stdout.strip() == (
            f"{server.tcp_url}/v1/sandboxes/{sandbox_id}/ports/8080/proxy/"
        )
        as_json = json.loads(tartarus("port", "--json", sandbox_id, "8080").stdout)
        assert as_json["port"] == 8080 and as_json["url"] == human.stdout.strip()
        bad = tartarus("port", sandbox_id, "70000")
        assert bad.returncode != 0 and "70000" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        tartarus("kill", sandbox_id)
