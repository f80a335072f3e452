"""The API server as a client sees it, for everything that needs no sandbox: service
endpoints, the OpenAPI document, problem+json errors for bad input, access control on
the unix socket and TCP, one server per runtime dir, and graceful shutdown."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.support.server import Server, running_server, server_env, start_server

pytestmark = pytest.mark.timeout(120)

PROBLEM = "application/problem+json"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with running_server(tmp_path / "srv") as s:
        yield s


def assert_problem(
    reply_status: int, headers: dict[str, str], body: bytes, status: int
) -> dict[str, Any]:
    assert reply_status == status, body
    assert headers["content-type"].startswith(PROBLEM)
    problem: dict[str, Any] = json.loads(body)
    assert problem["status"] == status
    assert problem["title"]
    assert problem["type"].startswith("https://")
    return problem


def test_health_ready_version(server: Server) -> None:
    assert server.raw("GET", "/v1/health").json() == {"status": "ok"}
    ready = server.raw("GET", "/v1/ready")
    assert ready.status == 200
    assert ready.json()["ready"] is True
    version = server.raw("GET", "/v1/version").json()
    assert version["api"] == "v1"
    assert version["version"]


def test_openapi_document_is_valid_openapi_31(server: Server) -> None:
    doc = server.raw("GET", "/v1/openapi.json").json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    ops = [op for item in doc["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in ops]
    assert len(ids) == len(set(ids))
    for op in ops:
        assert "422" in op["responses"] or "400" in op["responses"]
    assert "CreateSandboxRequest" in doc["components"]["schemas"]
    assert "Problem" in doc["components"]["schemas"]
    # Every request type forbids unknown fields, so the schema says so too.
    create = doc["components"]["schemas"]["CreateSandboxRequest"]
    assert create.get("additionalProperties") is False
    # Operations that need an id are linked from the ones that make it (OpenAPI links).
    created = doc["paths"]["/v1/sandboxes"]["post"]["responses"]["201"]["links"]
    assert created["exec_command"]["parameters"] == {"id": "$response.body#/id"}
    assert "list_sandboxes" not in created
    started = doc["paths"]["/v1/sandboxes/{id}/exec"]["post"]["responses"]["202"]["links"]
    assert started["kill_process"]["parameters"] == {
        "id": "$request.path.id",
        "pid": "$response.body#/pid",
    }


def test_malformed_json_is_400(server: Server) -> None:
    r = server.raw("POST", "/v1/sandboxes", b'{"template": ', {"Content-Type": "application/json"})
    problem = assert_problem(r.status, r.headers, r.body, 400)
    assert "not valid JSON" in problem["detail"]


@pytest.mark.parametrize(
    ("payload", "pointer"),
    [
        ({"template": 7}, "/template"),
        ({"timeout_s": "soon"}, "/timeout_s"),
        ({"timeout_s": -1}, "/timeout_s"),
        ({"resources": {"memory_mib": 1}}, "/resources/memory_mib"),
        ({"env": {"A=B": "x"}}, "/env"),
        ({"surprise": True}, "/surprise"),
        ({"resources": {"gpus": 8}}, "/resources/gpus"),
        ([1, 2, 3], "/"),
    ],
)
def test_wrong_types_and_unknown_fields_are_422(
    server: Server, payload: object, pointer: str
) -> None:
    r = server.json("POST", "/v1/sandboxes", payload)
    problem = assert_problem(r.status, r.headers, r.body, 422)
    assert problem["errors"][0]["pointer"].startswith(pointer.rstrip("/"))
    # Nothing was created.
    assert server.raw("GET", "/v1/sandboxes?state=created&state=running").json()["items"] == []


def test_huge_body_is_413_and_server_stays_healthy(server: Server) -> None:
    body = b'{"template": "' + b"x" * (8 << 20) + b'"}'
    r = server.raw("POST", "/v1/sandboxes", body, {"Content-Type": "application/json"})
    assert_problem(r.status, r.headers, r.body, 413)
    assert server.raw("GET", "/v1/health").status == 200


def test_unknown_route_and_method(server: Server) -> None:
    r = server.raw("GET", "/v1/nothing-here")
    assert_problem(r.status, r.headers, r.body, 404)
    r = server.raw("PATCH", "/v1/sandboxes")
    problem = assert_problem(r.status, r.headers, r.body, 405)
    assert "PATCH" in problem["detail"]


def test_unknown_sandbox_is_404(server: Server) -> None:
    for method, path in [
        ("GET", "/v1/sandboxes/sb-0123456789abcdef"),
        ("DELETE", "/v1/sandboxes/sb-0123456789abcdef"),
        ("GET", "/v1/sandboxes/sb-0123456789abcdef/files?path=/etc/passwd"),
        ("GET", "/v1/sandboxes/sb-0123456789abcdef/logs"),
    ]:
        r = server.raw(method, path)
        assert_problem(r.status, r.headers, r.body, 404)


def test_bad_query_parameters_are_422(server: Server) -> None:
    for query in ["limit=0", "limit=abc", "cursor=xyz", "state=sleeping", "bogus=1"]:
        r = server.raw("GET", f"/v1/sandboxes?{query}")
        assert_problem(r.status, r.headers, r.body, 422)


def test_socket_is_private(server: Server) -> None:
    mode = server.socket_path.stat().st_mode & 0o777
    assert mode == 0o600
    assert server.runtime_dir.stat().st_mode & 0o777 == 0o700


def test_peer_credentials_refuse_other_users(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root to connect as another uid (euid is {os.geteuid()})")
    # A socket another user can reach, to test the server's own check rather than the
    # file modes (which already keep other users out of the default location).
    open_dir = Path(tempfile.mkdtemp(prefix="tartarus-peercred-"))
    try:
        open_dir.chmod(0o711)
        sock = open_dir / "s.sock"
        with running_server(tmp_path, "--socket", str(sock)) as server:
            sock.chmod(0o666)
            probe = (
                "import os, socket\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(os.environ['SOCK'])\n"
                "s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\n"
                "Connection: close\\r\\n\\r\\n')\n"
                "print(s.recv(65536).decode().split('\\r\\n')[0])\n"
            )
            out = subprocess.run(
                [sys.executable, "-c", probe],
                env={"SOCK": str(sock)},
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert " 403 " in out.stdout
            assert server.raw("GET", "/v1/health").status == 200
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


def test_tcp_requires_the_api_key_when_set(tmp_path: Path) -> None:
    env = server_env(tmp_path, TARTARUS_API_KEY="s3cret-key")
    with running_server(tmp_path, env=env) as s:
        r = s.raw("GET", "/v1/health", tcp=True)
        assert_problem(r.status, r.headers, r.body, 401)
        r = s.raw("GET", "/v1/health", headers={"Authorization": "Bearer wrong"}, tcp=True)
        assert r.status == 401
        r = s.raw("GET", "/v1/health", headers={"Authorization": "Bearer s3cret-key"}, tcp=True)
        assert r.status == 200
        # The owner's unix socket needs no key.
        assert s.raw("GET", "/v1/health").status == 200


def test_refuses_public_tcp_without_a_key(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "serve", "--tcp", "0.0.0.0:0"],
        env=server_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "API key" in out.stderr


def test_one_server_per_runtime_dir(server: Server, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "serve"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "already runs" in out.stderr
    # The first server is untouched.
    assert server.raw("GET", "/v1/health").status == 200


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    s = start_server(tmp_path)
    assert s.stop(signal.SIGTERM) == 0
    assert not s.socket_path.exists()
    # A new server starts on the same dirs (the lock was released).
    with running_server(tmp_path) as again:
        assert again.raw("GET", "/v1/health").status == 200


# Sends itself SIGTERM the moment it is announced ready, as a supervisor may.
SIGTERM_AT_READY = """
import os, signal, anyio
from tartarus.config import load_settings
from tartarus.server.serve import ServeOptions, serve

def ready(endpoints):
    os.kill(os.getpid(), signal.SIGTERM)

anyio.run(lambda: serve(load_settings(), ServeOptions(), on_ready=ready))
print("stopped cleanly")
"""


@pytest.mark.timeout(120)
def test_sigterm_at_the_moment_of_readiness_stops_cleanly(tmp_path: Path) -> None:
    """The stop handlers are installed before readiness is announced: a SIGTERM that
    arrives right after the announcement is a clean stop, not death by signal."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_READY],
        env=server_env(tmp_path),
        capture_output=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr.decode()[-2000:])
    assert done.stdout == b"stopped cleanly\n"


def test_templates(server: Server) -> None:
    items = server.raw("GET", "/v1/templates").json()["items"]
    names = {t["name"]: t for t in items}
    assert {"base", "python"} <= set(names)
    assert names["base"]["builtin"] is True
    one = server.raw("GET", "/v1/templates/base")
    assert one.status == 200
    assert one.json()["name"] == "base"
    r = server.raw("GET", "/v1/templates/no-such-template")
    problem = assert_problem(r.status, r.headers, r.body, 404)
    assert "no template named" in problem["detail"]
