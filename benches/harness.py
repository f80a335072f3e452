"""The benchmark harness every bench uses.

A bench measures our operation and its peer (runsc, bwrap, wasmtime CLI, haproxy, ...)
in the same run on the same machine, prints a ratio, and writes a JSON result to
`benches/results/<name>.json` together with the machine it ran on.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class Stats(msgspec.Struct, frozen=True):
    """Wall-clock statistics of repeated runs, in milliseconds."""

    n: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_s: list[float]) -> Stats:
        ms = sorted(s * 1000 for s in samples_s)
        p99_index = min(len(ms) - 1, round(0.99 * (len(ms) - 1)))
        return cls(
            n=len(ms),
            mean_ms=round(statistics.fmean(ms), 4),
            p50_ms=round(statistics.median(ms), 4),
            p99_ms=round(ms[p99_index], 4),
            min_ms=round(ms[0], 4),
            max_ms=round(ms[-1], 4),
        )


def measure(fn: Callable[[], object], *, runs: int, warmup: int = 2) -> Stats:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return Stats.of(samples)


async def measure_async(
    fn: Callable[[], Awaitable[object]], *, runs: int, warmup: int = 2
) -> Stats:
    for _ in range(warmup):
        await fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - started)
    return Stats.of(samples)


def ratio(ours: Stats, peer: Stats) -> float:
    """How many times slower (>1) or faster (<1) we are than the peer, by median."""
    return round(ours.p50_ms / peer.p50_ms, 3) if peer.p50_ms else float("inf")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=RESULTS_DIR.parent,
    ).stdout.strip()
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit or None,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, results: dict[str, Any]) -> Path:
    """Writes `benches/results/<name>.json` with the machine description; returns its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {"bench": name, "machine": machine(), "results": results}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(document)) + b"\n")
    tmp.replace(path)
    return path


def report(label: str, ours: Stats, peer: Stats, peer_name: str) -> str:
    line = (
        f"{label}: ours p50 {ours.p50_ms:.3f} ms p99 {ours.p99_ms:.3f} ms | "
        f"{peer_name} p50 {peer.p50_ms:.3f} ms p99 {peer.p99_ms:.3f} ms | "
        f"ratio {ratio(ours, peer):.2f}x"
    )
    print(line)
    return line
