"""Fleet processes for tests: API servers (`tartarus serve --state URL`) and node agents
(`tartarus agent --join ...`), each a real process with its own dirs under tmp_path.

Agents use the real jail when this build has one (`process_runtime.real_jail_available`)
and otherwise the stand-in process runtime, named in the test output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from tests.support.process_runtime import real_jail_available
from tests.support.server import Reply, Server, server_env, start_server

REPO = Path(__file__).resolve().parent.parent.parent
TOKEN = "fleet-test-token-0123456789abcdef"
STAND_IN = "tests.support.process_runtime:stand_in"


def fleet_config(base: Path, **fleet: Any) -> Path:
    """A tartarus.toml with a [fleet] table (short timeouts make tests quick)."""
    values = {
        "heartbeat_ttl_s": 2.0,
        "placement_timeout_s": 10.0,
        "create_timeout_s": 60.0,
        "schedulers": 8,
        **fleet,
    }
    lines = ["[fleet]"]
    for key, value in values.items():
        if isinstance(value, dict):
            continue
        lines.append(f"{key} = {json.dumps(value)}")
    for key, value in values.items():
        if isinstance(value, dict):
            lines.append(f"[fleet.{key}]")
            for inner, v in value.items():
                text = json.dumps(v).replace('":', '" =')  # inline tables for lists of tables
                lines.append(f"{inner} = {text}")
    base.mkdir(parents=True, exist_ok=True)
    path = base / "tartarus.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def runtime_args() -> list[str]:
    return [] if real_jail_available() is None else ["--runtime-provider", STAND_IN]


def runtime_in_use() -> str:
    why = real_jail_available()
    return "the jail" if why is None else f"the stand-in process runtime ({why})"


def start_api(
    base: Path, state_url: str, *, host: str = "127.0.0.1", config: Path | None = None
) -> Server:
    env = server_env(base, TARTARUS_API_KEY=TOKEN)
    if config is not None:
        env["TARTARUS_CONFIG"] = str(config)
    server = start_server(base, "--state", state_url, env=env, listen=("--tcp", f"{host}:0"))
    server.extra["config"] = config
    return server


def start_agent(
    base: Path,
    join: Sequence[str],
    node_id: str,
    *extra: str,
    host: str = "127.0.0.1",
    prefix: tuple[str, ...] = (),
    config: Path | None = None,
) -> Server:
    env = server_env(base, PYTHONPATH=str(REPO))
    if config is not None:
        env["TARTARUS_CONFIG"] = str(config)
    args = [a for url in join for a in ("--join", url)]
    args += ["--token", TOKEN, "--node-id", node_id, "--drain-timeout", "1", *runtime_args()]
    return start_server(
        base,
        *args,
        *extra,
        env=env,
        command="agent",
        listen=("--listen", f"{host}:0"),
        prefix=prefix,
    )


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def call(server: Server, method: str, path: str, payload: Any = None, **kw: Any) -> Reply:
    body = None if payload is None else json.dumps(payload)
    return server.raw(method, path, body, auth(), tcp=True, **kw)


def wait_for(
    check: Callable[[], Any], *, timeout_s: float = 30.0, what: str = "a condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def nodes(api: Server) -> dict[str, Any]:
    reply = call(api, "GET", "/v1/nodes")
    assert reply.status == 200, reply.body
    return {n["spec"]["id"]: n for n in reply.json()["items"]}


@contextmanager
def stopping(*processes: Server) -> Iterator[ExitStack]:
    """Stops every process (SIGTERM, then SIGKILL) when the block ends."""
    with ExitStack() as stack:
        for p in processes:
            stack.callback(stop_process, p)
        yield stack


def stop_process(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except Exception:
            server.process.kill()
            server.process.wait()
