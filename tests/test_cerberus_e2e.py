"""Cerberus and the Judges end to end, on a real server with a real sandbox backend
(jail or gvisor): quotas hold under 50 concurrent creates, and a secret reaches the
sandbox's commands while appearing in no output the server produces."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anyio
import pytest

from tests.support.auth import call, make_key
from tests.support.server import require_backend, running_server, server_env

pytestmark = [pytest.mark.timeout(600), pytest.mark.anyio]

SECRET = "Tartarus-e2e-secret-7f3a9c21b5"
QUOTA = 5
CREATES = 50


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """The server's dirs: sandbox agents listen on unix sockets below the runtime dir,
    and a socket path must fit in 108 bytes (pytest's tmp_path is too deep)."""
    path = Path(tempfile.mkdtemp(prefix="tc-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_quota_holds_under_50_concurrent_creates(short_dir: Path) -> None:
    backend = require_backend()
    with running_server(short_dir, env=server_env(short_dir)) as server:
        policy = f"name: global\nspec: {{resources: {{max_sandboxes: {QUOTA}}}}}\n"
        assert server.json("PUT", "/v1/policies/global", {"document": policy}).status == 200
        _, token = make_key(server, "acme", ["developer"])
        headers = {"Authorization": f"Bearer {token}"}
        body = {"template": "base", "backend": backend, "timeout_s": 120}
        async with aiohttp.ClientSession(base_url=server.tcp_url, headers=headers) as session:

            async def create() -> tuple[int, str]:
                async with session.post("/v1/sandboxes", json=body) as r:
                    return r.status, await r.text()

            results: list[tuple[int, str]] = []

            async def one() -> None:
                results.append(await create())

            async with anyio.create_task_group() as tg:
                for _ in range(CREATES):
                    tg.start_soon(one)
            statuses = Counter(status for status, _ in results)
            assert statuses == {201: QUOTA, 429: CREATES - QUOTA}, results
            async with session.get("/v1/sandboxes?state=running") as r:
                live = (await r.json())["items"]
            assert len(live) == QUOTA
            for sandbox in live:
                async with session.delete(f"/v1/sandboxes/{sandbox['id']}") as r:
                    assert r.status == 204
            # The quota came back: one more fits.
            status, text = await create()
            assert status == 201, text
        entries = server.raw("GET", "/v1/audit?limit=1000").json()["items"]
        admissions = Counter(e["outcome"] for e in entries if e["kind"] == "admission")
        assert admissions == {"allowed": QUOTA + 1, "denied": CREATES - QUOTA}


def test_secrets_reach_the_sandbox_and_no_output(short_dir: Path) -> None:
    backend = require_backend()
    env = server_env(short_dir)

    def tartarus(*args: str, stdin: str = "") -> None:
        out = subprocess.run(
            [sys.executable, "-m", "tartarus", *args],
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr

    tartarus("secrets", "init")
    tartarus("secrets", "set", "--tenant", "acme", "db-password", stdin=SECRET)
    outputs: list[str] = []
    with running_server(short_dir, env=env) as server:
        _, token = make_key(server, "acme", ["developer"])
        created = call(
            server,
            token,
            "POST",
            "/v1/sandboxes",
            {"backend": backend, "secrets": {"DB_PASSWORD": "local:db-password"}},
        )
        assert created.status == 201, created.body
        sandbox = created.json()["id"]
        outputs.append(created.body.decode())
        digest = hashlib.sha256(SECRET.encode()).hexdigest()
        probe = {"cmd": 'printf %s "$DB_PASSWORD" | sha256sum'}
        ran = call(server, token, "POST", f"/v1/sandboxes/{sandbox}/exec", probe)
        assert ran.status == 200 and digest in ran.json()["stdout"], ran.body
        streamed = call(server, token, "POST", f"/v1/sandboxes/{sandbox}/exec/stream", probe)
        assert digest in streamed.body.decode()
        # A request that makes the server repeat the secret in an error.
        echoed = call(
            server,
            token,
            "POST",
            f"/v1/sandboxes/{sandbox}/exec",
            {"cmd": ["true"], "cwd": f"/nonexistent/{SECRET}"},
        )
        assert echoed.status >= 400
        for reply in (
            ran,
            streamed,
            echoed,
            call(server, token, "GET", f"/v1/sandboxes/{sandbox}"),
            call(server, token, "GET", f"/v1/sandboxes/{sandbox}/logs"),
            call(server, token, "GET", f"/v1/sandboxes/{sandbox}/processes"),
            server.raw("GET", "/v1/audit?limit=1000"),
        ):
            outputs.append(reply.body.decode(errors="replace"))
        missing = call(
            server,
            token,
            "POST",
            "/v1/sandboxes",
            {"backend": backend, "secrets": {"X": "local:no-such-secret"}},
        )
        assert missing.status == 422 and "local:no-such-secret" in missing.json()["detail"]
        outputs.append(missing.body.decode())
        assert call(server, token, "DELETE", f"/v1/sandboxes/{sandbox}").status == 204
    outputs.append(server.log())
    # Every file the server keeps (databases, their write-ahead logs) and its log.
    for path in sorted(server.state_dir.rglob("*")):
        if path.is_file():
            outputs.append(path.read_bytes().decode(errors="replace"))
    leaks = [i for i, text in enumerate(outputs) if SECRET in text]
    assert leaks == [], [outputs[i][:500] for i in leaks]
    assert json.loads(outputs[0])["secrets"] == {"DB_PASSWORD": "local:db-password"}
