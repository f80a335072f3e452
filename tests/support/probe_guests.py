"""Builds the probe guests (`rust/vmm/guests/<name>.S`) with binutils `as` and `ld`.

The ELF is cached under `~/.cache/tartarus/probe-guests/<hash of the sources>/`, so
tests and benches build it once per change. It has the 64-bit vmlinux-style entry
(`_start`) and a PVH note, so any VMM that boots a vmlinux can load it.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tartarus.binaries import find_binary
from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport

GUEST_DIR = Path(__file__).resolve().parents[2] / "rust" / "vmm" / "guests"
LINKER_SCRIPT = "probe.ld"
# Included by every guest: COM1 output and the i8042 reset.
SHARED = ("console.inc",)


def vmm_binary(doctor_report: DoctorReport) -> str:
    """The installed `tartarus-vmm`; skips with the doctor's reason without /dev/kvm."""
    kvm = doctor_report.kernel.kvm
    if not kvm.openable:
        pytest.skip(f"no usable /dev/kvm: {kvm.detail}")
    return str(find_binary("tartarus-vmm"))


def seccomp_selftest(vmm_bin: str, thread: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`tartarus-vmm seccomp-selftest THREAD`: installs the filters, then makes a call
    the thread may not make; checks the filters were installed and did not let it by."""
    proc = subprocess.run(
        [vmm_bin, "seccomp-selftest", thread, *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "api filter installed" in proc.stdout
    assert "survived" not in proc.stdout
    return proc


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


def _cache_dir(name: str, extra: bytes = b"") -> Path:
    """The cache directory for guest `name`, keyed by its sources (and `extra`)."""
    digest = hashlib.sha256(extra)
    for source in (f"{name}.S", LINKER_SCRIPT, *SHARED):
        digest.update((GUEST_DIR / source).read_bytes())
    return load_settings().cache_dir / "probe-guests" / digest.hexdigest()[:16]


def _assemble(source: Path, obj: Path) -> Path:
    subprocess.run(["as", "--64", "-I", str(GUEST_DIR), "-o", str(obj), str(source)], check=True)
    return obj


def _link(script: Path, out: Path, *objs: Path) -> Path:
    subprocess.run(
        ["ld", "--no-warn-rwx-segments", "-nostdlib", "-static", "-T", str(script), "-o", str(out)]
        + [str(o) for o in objs],
        check=True,
    )
    return out


def _build(target: Path, make: Callable[[Path], Path]) -> Path:
    """Builds `target` once: `make(tmp_dir)` returns the staged file."""
    if target.is_file():
        return target
    for tool in ("as", "ld", "objcopy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (binutils) is needed to build the probe guests")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # Atomic: parallel test workers never see a half-written guest.
        make(Path(tmp)).replace(target)
    return target


def build_probe_guest(name: str = "probe") -> Path:
    """Returns the path of probe guest `name` (`probe`, `virtio_probe`), building it if
    its sources changed."""

    def make(tmp: Path) -> Path:
        obj = _assemble(GUEST_DIR / f"{name}.S", tmp / f"{name}.o")
        return _link(GUEST_DIR / LINKER_SCRIPT, tmp / f"{name}.elf", obj)

    return _build(_cache_dir(name) / f"{name}.elf", make)


# A bzImage's 64-bit entry point is 0x200 bytes into its protected-mode part, which the
# VMM loads at 1 MiB (`code32_start`): the wrapper links the probe behind a jump there.
BZIMAGE_HEAD = """\
    .section .bzhead, "ax"
    .code64
    jmp _start
"""
BZIMAGE_SECTION = "    .bzhead : { . = 0x200; *(.bzhead) } :text\n"
SETUP_SECTS = 1


def bzimage_setup(payload_len: int) -> bytearray:
    """The real-mode part of a bzImage (boot sector + `SETUP_SECTS` sectors) holding the
    setup header a 64-bit boot loader reads (Documentation/arch/x86/boot.rst)."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, SETUP_SECTS)
    struct.pack_into("<I", setup, 0x1F4, (payload_len + 15) // 16)  # syssize
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)  # boot_flag
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)  # protocol version 2.15
    struct.pack_into("<B", setup, 0x211, 0x01)  # loadflags: LOADED_HIGH
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<H", setup, 0x236, 0x1)  # xloadflags: XLF_KERNEL_64
    struct.pack_into("<I", setup, 0x260, payload_len)  # init_size
    return setup


def build_probe_bzimage() -> Path:
    """The probe guest as a bzImage (setup sectors + flat 64-bit image), for the VMM's
    bzImage loader; it runs the same programs as the ELF through the 64-bit entry."""
    script = (GUEST_DIR / LINKER_SCRIPT).read_text()
    anchor = "    . = 0x100000;\n"
    assert anchor in script, "probe.ld no longer starts the image at 1 MiB"
    script = script.replace(anchor, anchor + BZIMAGE_SECTION)

    def make(tmp: Path) -> Path:
        (tmp / "probe.ld").write_text(script)
        (tmp / "head.S").write_text(BZIMAGE_HEAD)
        elf = _link(
            tmp / "probe.ld",
            tmp / "probe.elf",
            _assemble(GUEST_DIR / "probe.S", tmp / "probe.o"),
            _assemble(tmp / "head.S", tmp / "head.o"),
        )
        flat = tmp / "probe.bin"
        subprocess.run(["objcopy", "-O", "binary", str(elf), str(flat)], check=True)
        payload = flat.read_bytes()
        out = tmp / "probe.bzImage"
        out.write_bytes(bytes(bzimage_setup(len(payload))) + payload)
        return out

    return _build(_cache_dir("probe", (script + BZIMAGE_HEAD).encode()) / "probe.bzImage", make)
