"""2 MiB huge pages for tests: what /proc/meminfo says, and a reservation that raises
vm.nr_hugepages as root when the pool is short (and lowers it back after)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


@contextlib.contextmanager
def free_huge_pages(count: int) -> Iterator[int]:
    """`count` free 2 MiB pages for the block, else a skip saying what the host offers."""
    info = meminfo()
    if info.get("Hugepagesize") != 2048:
        pytest.skip(f"default huge page size is {info.get('Hugepagesize')} kB, not 2048")
    added = 0
    if info["HugePages_Free"] < count and os.geteuid() == 0:
        total = int(NR_HUGEPAGES.read_text())
        with contextlib.suppress(OSError):
            NR_HUGEPAGES.write_text(str(total + count - info["HugePages_Free"]))
        added = int(NR_HUGEPAGES.read_text()) - total
    free = meminfo()["HugePages_Free"]
    try:
        if free < count:
            pytest.skip(
                f"{count} free 2 MiB huge pages needed; HugePages_Free is {free} "
                f"after asking {NR_HUGEPAGES} for more (euid {os.geteuid()})"
            )
        yield count
    finally:
        if added > 0:
            NR_HUGEPAGES.write_text(str(max(0, int(NR_HUGEPAGES.read_text()) - added)))
