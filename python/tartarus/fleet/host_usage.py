"""What a node measures about its host: CPUs and memory it has, and how busy they are."""

from __future__ import annotations

import os
from pathlib import Path


def _cpu_times(proc: Path) -> tuple[int, int]:
    """(busy, total) jiffies since boot, from the first line of /proc/stat."""
    fields = [int(x) for x in (proc / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _meminfo(proc: Path) -> dict[str, int]:
    out = {}
    for line in (proc / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])  # kB
    return out


def host_cpus() -> float:
    return float(len(os.sched_getaffinity(0)))


def host_memory_mib(proc: Path = Path("/proc")) -> int:
    return _meminfo(proc)["MemTotal"] // 1024


class HostUsage:
    """CPU utilisation over the interval since the last sample, and memory in use."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc
        self._last = _cpu_times(proc)

    def cpu(self) -> float:
        busy, total = _cpu_times(self._proc)
        last_busy, last_total = self._last
        self._last = (busy, total)
        return (busy - last_busy) / (total - last_total) if total > last_total else 0.0

    def memory(self) -> float:
        info = _meminfo(self._proc)
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable", info.get("MemFree", 0))
        return 1 - available / total if total else 0.0
