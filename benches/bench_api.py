"""API overhead: create → exec → delete through the server (SDK over the unix socket)
next to the same steps on the raw backend in-process (with its teardown, and with only
its create + exec timed: a DELETE answers once the sandbox is halted), and GET /v1/sandboxes/{id}
requests per second at 64 concurrent clients (an aiohttp client over the unix socket
and over TCP, and wrk over TCP when it is installed) next to the backend's own
`status()` call.

    python -m benches.bench_api [--backend jail] [--runs 30] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from benches.harness import Stats, measure_async, ratio, report, write_result
from tartarus.config import load_settings
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.base import Sandbox as RuntimeSandbox
from tartarus.runtime.types import Backend, ExecRequest, SandboxSpec
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox

CONCURRENCY = 64


def start_server(base: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    env = dict(os.environ)
    env.pop("TARTARUS_URL", None)
    env.update(TARTARUS_RUNTIME_DIR=str(base / "run"), TARTARUS_STATE_DIR=str(base / "state"))
    announce = base / "announce.json"
    with announce.open("wb") as out, (base / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tartarus", "serve", "--json", "--tcp", "127.0.0.1:0"],
            stdout=out,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = announce.read_text()
        if text.strip().endswith("}"):
            return proc, json.loads(text)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError((base / "server.log").read_text())


async def sdk_cycle(url: str, backend: Backend, template: str) -> None:
    async with Sandbox.create(template, backend=backend, url=url, timeout=120) as sb:
        result = await sb.commands.run(["true"])
        assert result.exit_code == 0, result


@asynccontextmanager
async def raw_sandbox(
    provider: HostRuntimes, backend: Backend, template: str
) -> AsyncIterator[RuntimeSandbox]:
    """A sandbox straight from the backend, as the server makes one (minus the server)."""
    spec = SandboxSpec(id=f"bench-{time.monotonic_ns():x}", template=template, backend=backend)
    runtime, _ = await provider.select(spec)
    spec, _ = await provider.prepare(spec, runtime.backend)
    sandbox = await runtime.create(spec)
    try:
        await sandbox.start()
        yield sandbox
    finally:
        await sandbox.kill()
        await provider.release(spec.id)


async def raw_cycle(provider: HostRuntimes, backend: Backend, template: str) -> None:
    async with raw_sandbox(provider, backend, template) as sandbox:
        result = await (await sandbox.exec(ExecRequest(argv=["true"]))).wait()
        assert result.exit.code == 0, result


async def raw_create_exec(
    provider: HostRuntimes, backend: Backend, template: str, runs: int, warmup: int = 2
) -> Stats:
    """The raw backend's create + exec only, its teardown untimed: what a DELETE that
    answers once the sandbox is halted is measured against."""
    samples = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        async with raw_sandbox(provider, backend, template) as sandbox:
            result = await (await sandbox.exec(ExecRequest(argv=["true"]))).wait()
            elapsed = time.perf_counter() - started
            assert result.exit.code == 0, result
        if i >= warmup:
            samples.append(elapsed)
    return Stats.of(samples)


async def cycles_per_second(cycle: Callable[[], Awaitable[None]], seconds: float) -> dict[str, Any]:
    """Sandboxes per second: CONCURRENCY tasks each running create → exec → delete
    cycles for `seconds`; a failed cycle is counted, not raised."""
    done = failed = 0
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done, failed
        while time.monotonic() < deadline:
            try:
                await cycle()
            except Exception as e:  # counted, the run goes on
                failed += 1
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            else:
                done += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - started
    return {
        "sandboxes": done,
        "failed": failed,
        "errors": errors,
        "per_s": round(done / elapsed, 1),
    }


async def hammer(session: aiohttp.ClientSession, url: str, seconds: float) -> tuple[int, int]:
    """GETs `url` from CONCURRENCY tasks for `seconds`; returns (ok, failed)."""
    ok = failed = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal ok, failed
        while time.monotonic() < deadline:
            async with session.get(url) as response:
                await response.read()
                if response.status == 200:
                    ok += 1
                else:
                    failed += 1

    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    return ok, failed


async def rps(connector: aiohttp.BaseConnector, url: str, seconds: float) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=connector) as session:
        await hammer(session, url, 0.5)  # warm the pool
        started = time.perf_counter()
        ok, failed = await hammer(session, url, seconds)
        elapsed = time.perf_counter() - started
    return {"requests": ok, "failed": failed, "rps": round(ok / elapsed, 1)}


def wrk_rps(url: str, seconds: float) -> dict[str, Any] | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run(
        [wrk, "-t2", f"-c{CONCURRENCY}", f"-d{int(seconds)}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("Requests/sec:"))
    p50 = next((x.split()[1] for x in out.splitlines() if x.strip().startswith("50%")), None)
    p99 = next((x.split()[1] for x in out.splitlines() if x.strip().startswith("99%")), None)
    return {"rps": float(line.split()[1]), "latency_p50": p50, "latency_p99": p99}


async def main(backend: Backend, template: str, runs: int, seconds: float) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="tartarus-bench-api-"))
    proc, announce = start_server(base)
    try:
        unix_url = next(e for e in announce["endpoints"] if e.startswith("unix:"))
        tcp_url = next(e for e in announce["endpoints"] if e.startswith("http"))
        ours = await measure_async(lambda: sdk_cycle(unix_url, backend, template), runs=runs)
        provider = HostRuntimes(load_settings())
        peer = await measure_async(lambda: raw_cycle(provider, backend, template), runs=runs)
        report(f"create→exec→delete ({backend.value})", ours, peer, "raw backend")
        untimed = await raw_create_exec(provider, backend, template, runs)
        api_rate = await cycles_per_second(lambda: sdk_cycle(unix_url, backend, template), seconds)
        raw_rate = await cycles_per_second(lambda: raw_cycle(provider, backend, template), seconds)
        rate_ratio = round(api_rate["per_s"] / raw_rate["per_s"], 3) if raw_rate["per_s"] else 0
        print(
            f"create→exec→delete @ {CONCURRENCY} clients: API {api_rate['per_s']}/s "
            f"({api_rate['failed']} failed), raw backend {raw_rate['per_s']}/s "
            f"({raw_rate['failed']} failed): {rate_ratio}x the raw rate"
        )
        report(
            f"create→exec→delete ({backend.value})",
            ours,
            untimed,
            "raw create+exec, teardown untimed",
        )

        async with await Client.connect(unix_url) as client:
            sb = await Sandbox.create(template, backend=backend, client=client, timeout=600)
            path = f"/v1/sandboxes/{sb.id}"
            unix = await rps(
                aiohttp.UnixConnector(path=unix_url.removeprefix("unix:")),
                f"http://localhost{path}",
                seconds,
            )
            tcp = await rps(aiohttp.TCPConnector(limit=CONCURRENCY), tcp_url + path, seconds)
            wrk = wrk_rps(tcp_url + path, seconds)
            status: Stats = await measure_async(sb.get_info, runs=200)
            await sb.kill()
        raw_status = await raw_status_stats(provider, backend, template)
        print(
            f"GET {path} @ {CONCURRENCY} clients: unix {unix['rps']} req/s, "
            f"tcp {tcp['rps']} req/s" + (f", wrk {wrk['rps']} req/s" if wrk else "")
        )
        report("one GET (SDK, sequential)", status, raw_status, "raw status()")
        return {
            "backend": backend.value,
            "template": template,
            "create_exec_delete": {"api": ours, "raw_backend": peer, "ratio": ratio(ours, peer)},
            "create_exec_delete_vs_raw_create_exec": {
                "api": ours,
                "raw_create_exec": untimed,
                "ratio": ratio(ours, untimed),
            },
            "concurrent_cycles": {
                "concurrency": CONCURRENCY,
                "seconds": seconds,
                "api": api_rate,
                "raw_backend": raw_rate,
                "api_over_raw": rate_ratio,
            },
            "get_sandbox_rps": {
                "concurrency": CONCURRENCY,
                "seconds": seconds,
                "aiohttp_unix": unix,
                "aiohttp_tcp": tcp,
                "wrk_tcp": wrk,
            },
            "get_sandbox_latency": {
                "api_sdk": status,
                "raw_status": raw_status,
                "ratio": ratio(status, raw_status),
            },
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)


async def raw_status_stats(provider: HostRuntimes, backend: Backend, template: str) -> Stats:
    async with raw_sandbox(provider, backend, template) as sandbox:
        return await measure_async(sandbox.status, runs=200)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="jail", choices=[b.value for b in Backend])
    parser.add_argument("--template", default="base")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    results = anyio.run(main, Backend(args.backend), args.template, args.runs, args.seconds)
    print(write_result("api", results))
