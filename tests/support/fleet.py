"""Fleet processes for tests: API servers (`tartarus serve --state URL`) and node agents
(`tartarus agent --join ...`), each a real process with its own dirs under tmp_path.

Agents offer the jail backend (`--backend jail`: the fastest real isolation here) and
sandboxes ask for it (`SANDBOX`), so every sandbox of the fleet tests is a real jail.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.images import TemplateStore
from tartarus.node.store import SandboxRecord
from tartarus.paths import default_cache_dir
from tartarus.runtime.jail import JailRuntime
from tartarus.runtime.selector import sandbox_state_dir
from tartarus.runtime.types import Backend, SandboxState
from tests.support.server import Reply, Server, server_env, start_server

REPO = Path(__file__).resolve().parent.parent.parent
TOKEN = "fleet-test-token-0123456789abcdef"
# What every test sandbox asks for: the jail, on the base (busybox) template.
SANDBOX = {"backend": "jail", "template": "base"}
# A memory hog for the base template: busybox awk holds `mib` strings of 1 MiB (each
# page written), then waits.
HOG = (
    'awk \'BEGIN {{ s = sprintf("%1048576s", ""); '
    'for (i = 0; i < {mib}; i++) a[i] = s i; system("sleep 60") }}\''
)


def require_jail(report: DoctorReport) -> None:
    """Skips with the doctor's reason where the jail cannot run."""
    verdict = report.backend(Backend.JAIL.value)
    if not verdict.available:
        pytest.skip(
            f"the fleet tests run sandboxes in the jail, which cannot run here: {verdict.reason}"
        )


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
    credentials: Sequence[str] = ("--token", TOKEN),
    backends: Sequence[str] = ("jail",),
) -> Server:
    """Starts `tartarus agent`; `credentials`: how it authenticates (the fleet's token,
    or `--ca/--cert/--key`); `backends`: what it offers."""
    env = server_env(base, PYTHONPATH=str(REPO))
    if config is not None:
        env["TARTARUS_CONFIG"] = str(config)
    if prefix:
        # An agent in a network namespace cannot reach the Debian mirror the base
        # template is built from: fill its template store (state dir) first.
        anyio.run(build_base_template, Path(env["TARTARUS_STATE_DIR"]))
    args = [a for url in join for a in ("--join", url)]
    args += [*credentials, "--node-id", node_id, "--drain-timeout", "1"]
    args += [a for b in backends for a in ("--backend", b)]
    return start_server(
        base,
        *args,
        *extra,
        env=env,
        command="agent",
        listen=("--listen", f"{host}:0"),
        prefix=prefix,
    )


async def build_base_template(state_dir: Path) -> None:
    settings = Settings(state_dir=state_dir, cache_dir=default_cache_dir())
    await TemplateStore(settings).resolve(SANDBOX["template"], ext4=False)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def call(
    server: Server,
    method: str,
    path: str,
    payload: Any = None,
    *,
    headers: dict[str, str] | None = None,
    **kw: Any,
) -> Reply:
    body = None if payload is None else json.dumps(payload)
    return server.raw(method, path, body, {**auth(), **(headers or {})}, tcp=True, **kw)


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


def reap_leftovers(agent_base: Path) -> list[str]:
    """Kills the jails (and removes their cgroups) that an agent whose dirs are under
    `agent_base` left behind when it was SIGKILLed."""
    settings = Settings(runtime_dir=agent_base / "run", state_dir=agent_base / "state")
    return anyio.run(JailRuntime(sandbox_state_dir(settings)).reap, set())


def queued_record(sandbox_id: str) -> SandboxRecord:
    """A record as a fleet's intake writes it: created, waiting for a node."""
    return SandboxRecord(
        id=sandbox_id,
        template="base",
        backend=Backend.JAIL,
        state=SandboxState.CREATED,
        created_at=time.time(),
    )
