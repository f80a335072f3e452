"""Builds the probe guests (`rust/vmm/guests/<name>.S`) with binutils `as` and `ld`.

The ELF is cached under `~/.cache/tartarus/probe-guests/<hash of the sources>/`, so
tests and benches build it once per change. It has the 64-bit vmlinux-style entry
(`_start`) and a PVH note, so any VMM that boots a vmlinux can load it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from tartarus.config import load_settings

GUEST_DIR = Path(__file__).resolve().parents[2] / "rust" / "vmm" / "guests"
LINKER_SCRIPT = "probe.ld"
# Included by every guest: COM1 output and the i8042 reset.
SHARED = ("console.inc",)


def xorshift_result(rounds: int) -> int:
    """What the guest's `compute N` program prints (x ^ sum of all x, 64-bit)."""
    mask = (1 << 64) - 1
    x, total = 0x2545F4914F6CDD1D, 0
    for _ in range(rounds):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        total = (total + x) & mask
    return x ^ total


def walk_result(rounds: int, memory_mib: int) -> int:
    """What the guest's `walk N` program prints: round i is added to page i mod P of
    the P pages from 2 MiB to the top of RAM; the result is the sum of each page's
    value times (its index + 1), 64-bit."""
    pages = ((memory_mib << 20) - (2 << 20)) // 4096
    mask = (1 << 64) - 1
    values = [0] * pages
    for i in range(rounds):
        values[i % pages] += i
    return sum(v * (j + 1) for j, v in enumerate(values)) & mask


def build_probe_guest(name: str = "probe") -> Path:
    """Returns the path of probe guest `name` (`probe`, `virtio_probe`), building it if
    its sources changed."""
    sources = (f"{name}.S", LINKER_SCRIPT, *SHARED)
    digest = hashlib.sha256()
    for source in sources:
        digest.update((GUEST_DIR / source).read_bytes())
    out_dir = load_settings().cache_dir / "probe-guests" / digest.hexdigest()[:16]
    elf = out_dir / f"{name}.elf"
    if elf.is_file():
        return elf
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (binutils) is needed to build the probe guest")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj = Path(tmp) / f"{name}.o"
        staged = Path(tmp) / f"{name}.elf"
        subprocess.run(
            ["as", "--64", "-I", str(GUEST_DIR), "-o", str(obj), str(GUEST_DIR / f"{name}.S")],
            check=True,
        )
        subprocess.run(
            [
                "ld",
                "--no-warn-rwx-segments",
                "-nostdlib",
                "-static",
                "-T",
                str(GUEST_DIR / LINKER_SCRIPT),
                "-o",
                str(staged),
                str(obj),
            ],
            check=True,
        )
        # Atomic: parallel test workers never see a half-written guest.
        staged.replace(elf)
    return elf
