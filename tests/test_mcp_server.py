"""`tartarus mcp` (Iris) end to end: the official MCP SDK's client against the real
server over stdio and streamable HTTP, in front of a real `tartarus serve` with a real
backend. Tool calls act with the caller's API key; bad credentials and calls over the
per-client limits are refused, and every call lands in the API's audit log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tests.support.auth import make_key
from tests.support.server import Server

pytestmark = [pytest.mark.timeout(300), pytest.mark.anyio]

TOOLS = {
    "create_sandbox",
    "run_command",
    "run_code",
    "read_file",
    "write_file",
    "list_files",
    "kill_sandbox",
}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


@pytest.fixture(scope="module")
def token(server: Server) -> str:
    return make_key(server, "acme", ["developer"], name="agent")[1]


def mcp_env(server: Server, api_key: str | None) -> dict[str, str]:
    env = dict(server.env, TARTARUS_URL=server.tcp_url or "")
    env.pop("TARTARUS_API_KEY", None)
    if api_key is not None:
        env["TARTARUS_API_KEY"] = api_key
    return env


def stdio_client(server: Server, api_key: str | None, *args: str) -> Client:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "tartarus", "mcp", *args],
        env=mcp_env(server, api_key),
    )
    return Client(params, read_timeout_seconds=120)


@contextmanager
def http_mcp(server: Server, *args: str) -> Iterator[str]:
    """`tartarus mcp --transport http` on a free loopback port; yields its URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tartarus",
            "mcp",
            "--transport",
            "http",
            "--port",
            "0",
            "--json",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=mcp_env(server, None),
    )
    try:
        assert process.stdout is not None
        text = b""
        while not text.rstrip().endswith(b"}"):
            line = process.stdout.readline()
            assert line, process.stderr.read().decode() if process.stderr else ""
            text += line
        yield str(json.loads(text)["url"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@asynccontextmanager
async def http_client(url: str, api_key: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http)) as client,
    ):
        yield client


def payload(result: CallToolResult) -> Any:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        structured = result.structured_content
        return structured.get("result", structured)
    first = result.content[0]
    assert isinstance(first, TextContent)
    return json.loads(first.text)


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


def audit(server: Server) -> list[dict[str, Any]]:
    return list(server.json("GET", "/v1/audit?limit=1000").json()["items"])


async def exercise(client: Client) -> str:
    """Every tool once, as an agent would; returns the sandbox's id."""
    names = {tool.name for tool in (await client.list_tools()).tools}
    assert names >= TOOLS
    created = payload(await client.call_tool("create_sandbox", {"timeout_s": 120}))
    sandbox_id = created["sandbox_id"]
    ran = payload(
        await client.call_tool(
            "run_command", {"sandbox_id": sandbox_id, "command": "echo hi; echo oops >&2; exit 3"}
        )
    )
    assert ran == {
        "exit_code": 3,
        "stdout": "hi\n",
        "stderr": "oops\n",
        "error": "exited with code 3",
    }
    written = payload(
        await client.call_tool(
            "write_file",
            {"sandbox_id": sandbox_id, "path": "/tmp/work/notes.txt", "content": "héllo\n"},
        )
    )
    assert written["size"] == len("héllo\n".encode())
    read = await client.call_tool(
        "read_file", {"sandbox_id": sandbox_id, "path": "/tmp/work/notes.txt"}
    )
    assert payload(read) == "héllo\n" if read.structured_content else True
    assert any(isinstance(c, TextContent) and c.text == "héllo\n" for c in read.content)
    listed = payload(
        await client.call_tool("list_files", {"sandbox_id": sandbox_id, "path": "/tmp/work"})
    )
    assert [(e["name"], e["kind"]) for e in listed] == [("notes.txt", "file")]
    first = await client.call_tool(
        "run_code", {"sandbox_id": sandbox_id, "code": "x = 20\nprint('set')"}
    )
    assert not first.is_error, first.content
    second = await client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": "x * 2 + 2"})
    described = json.loads(second.content[0].text)  # type: ignore[union-attr]
    assert described["text"] == "42"
    failed = await client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": "1/0"})
    assert json.loads(failed.content[0].text)["error"]["name"] == "ZeroDivisionError"  # type: ignore[union-attr]
    missing = await client.call_tool(
        "read_file", {"sandbox_id": sandbox_id, "path": "/tmp/work/absent"}
    )
    assert "absent" in error_text(missing)
    killed = payload(await client.call_tool("kill_sandbox", {"sandbox_id": sandbox_id}))
    assert killed == {"sandbox_id": sandbox_id, "killed": True}
    return str(sandbox_id)


def assert_audited(server: Server, sandbox_id: str) -> None:
    """Every tool call of the session is in the audit log, as the key's principal."""
    calls = [
        e for e in audit(server) if e["kind"] == "client" and e["resource"].get("id") == sandbox_id
    ]
    assert {e["action"] for e in calls} >= {f"mcp.{t}" for t in TOOLS - {"create_sandbox"}}
    for entry in calls:
        assert (entry["tenant"], entry["subject"], entry["method"]) == (
            "acme",
            "key:agent",
            "api-key",
        )
    outcomes = {(e["action"], e["outcome"]) for e in calls}
    assert ("mcp.read_file", "failed") in outcomes
    assert ("mcp.kill_sandbox", "allowed") in outcomes


async def test_every_tool_over_stdio(server: Server, token: str) -> None:
    async with stdio_client(server, token) as client:
        sandbox_id = await exercise(client)
    assert_audited(server, sandbox_id)
    # The sandbox was made with the key, so it is the key's tenant's.
    info = server.json("GET", f"/v1/sandboxes/{sandbox_id}").json()
    assert info["tenant"] == "acme"


async def test_every_tool_over_http(server: Server, token: str) -> None:
    with http_mcp(server) as url:
        async with http_client(url, token) as client:
            sandbox_id = await exercise(client)
    assert_audited(server, sandbox_id)


async def test_http_without_valid_credentials_is_refused_and_audited(
    server: Server, token: str
) -> None:
    with http_mcp(server) as url:
        for bearer in (None, "tsk_" + "0" * 40, token[:-2] + "xx"):
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            async with httpx2.AsyncClient(headers=headers) as http:
                r = await http.post(
                    url,
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    headers={"Accept": "application/json, text/event-stream"},
                )
            assert r.status_code == 401, r.text
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    refused = [
        e for e in audit(server) if e["action"] == "whoami" and e["outcome"] == "unauthenticated"
    ]
    assert len(refused) >= 2


async def test_stdio_with_a_bad_key_refuses_every_call_and_audits_it(server: Server) -> None:
    before = len(audit(server))
    async with stdio_client(server, "tsk_" + "1" * 40) as client:
        result = await client.call_tool("create_sandbox", {})
        assert "401" in error_text(result)
    new = audit(server)[before:]
    assert any(e["outcome"] == "unauthenticated" and e["status"] == 401 for e in new), new


async def test_limits_refuse_and_audit(server: Server) -> None:
    _, key = make_key(server, "acme", ["developer"], name="limited")
    with http_mcp(server, "--max-sandboxes", "1") as url:
        async with http_client(url, key) as client:
            first = payload(await client.call_tool("create_sandbox", {"timeout_s": 60}))
            second = await client.call_tool("create_sandbox", {"timeout_s": 60})
            assert "limit of 1 running sandboxes" in error_text(second)
            await client.call_tool("kill_sandbox", {"sandbox_id": first["sandbox_id"]})
            # Killed, it no longer counts.
            third = payload(await client.call_tool("create_sandbox", {"timeout_s": 60}))
            await client.call_tool("kill_sandbox", {"sandbox_id": third["sandbox_id"]})
    # One call a minute: the second call, right after the first, is over the limit (the
    # bucket refills one call per 60 s).
    nobody = {"sandbox_id": "sb-0000000000000000"}
    with http_mcp(server, "--calls-per-minute", "1") as url:
        async with http_client(url, key) as client:
            assert "not found" in error_text(await client.call_tool("kill_sandbox", nobody)).lower()
            over = await client.call_tool("list_files", nobody)
            assert "limit of 1 tool calls a minute" in error_text(over)
    denied = [
        e
        for e in audit(server)
        if e["kind"] == "client" and e["subject"] == "key:limited" and e["outcome"] == "denied"
    ]
    assert [(e["action"], e["status"]) for e in denied] == [
        ("mcp.create_sandbox", 429),
        ("mcp.list_files", 429),
    ]
    assert "running sandboxes" in denied[0]["detail"]
    assert "a minute" in denied[1]["detail"]


def test_the_audit_event_route_refuses_bad_bodies(server: Server, token: str) -> None:
    from tests.support.auth import call  # noqa: PLC0415

    good = {"action": "mcp.run_code", "outcome": "allowed"}
    assert call(server, token, "POST", "/v1/audit/events", good).status == 204
    for bad in (
        {"action": "run_code", "outcome": "allowed"},
        {"action": "mcp.x", "outcome": "sure"},
        {"action": "mcp.x", "outcome": "allowed", "detail": "x" * 2000},
        {"action": "mcp.x", "outcome": "allowed", "tenant": "other"},
        {"action": "mcp.x", "outcome": "allowed", "resource": {str(i): "v" for i in range(9)}},
    ):
        r = call(server, token, "POST", "/v1/audit/events", bad)
        assert r.status in (400, 422), (bad, r.status, r.body)
    assert call(server, None, "POST", "/v1/audit/events", good).status == 401
    last = audit(server)[-1]
    # The tenant comes from the key, never from the body.
    assert (last["kind"], last["tenant"]) != ("client", "other")


def test_the_command_needs_no_server_to_show_its_help() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARTARUS_")}
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "mcp", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=Path.cwd(),
    )
    assert "--transport [stdio|http]" in out.stdout
