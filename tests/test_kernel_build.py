"""The guest kernel build: real, from Debian's linux-source-6.1, cached by its inputs.

The first run on a machine compiles the kernel (about 8 minutes on 2 busy cores); every
later run finds it in `~/.cache/tartarus/kernels/<id>` and only checks it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from tartarus.config import load_settings
from tartarus.guest import kernel_build, kernel_config
from tartarus.guest.kernel_build import KernelBuildError, KernelManifest

TARTARUS = str(Path(sys.executable).parent / "tartarus")
# Xen ELF note type that carries the PVH 32-bit entry point.
XEN_ELFNOTE_PHYS32_ENTRY = 18


def _require_source() -> None:
    if not kernel_build.DEFAULT_SOURCE.is_file():
        pytest.skip(f"{kernel_build.DEFAULT_SOURCE} missing (apt-get install linux-source-6.1)")


@pytest.fixture(scope="module")
def built_kernel() -> KernelManifest:
    _require_source()
    return kernel_build.build_kernel(load_settings().cache_dir)


def _elf_notes(path: Path) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of every PT_NOTE segment entry of a 64-bit ELF."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    (machine,) = struct.unpack_from("<H", data, 18)
    assert machine == 62, "not x86-64"
    phoff, phentsize, phnum = (
        struct.unpack_from("<Q", data, 32)[0],
        *struct.unpack_from("<HH", data, 54),
    )
    notes = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:
            continue
        at, end = p_offset, p_offset + p_filesz
        while at + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, at)
            name = data[at + 12 : at + 12 + namesz].rstrip(b"\0")
            desc_at = at + 12 + ((namesz + 3) & ~3)
            notes.append((name, ntype, data[desc_at : desc_at + descsz]))
            at = desc_at + ((descsz + 3) & ~3)
    return notes


@pytest.mark.timeout(1800)
def test_kernel_is_built_with_every_required_option(built_kernel: KernelManifest) -> None:
    entry = kernel_build.kernel_dir(load_settings().cache_dir, built_kernel.id)
    config = kernel_config.read_dotconfig(entry / "config")
    assert kernel_config.check(config, kernel_config.required_options()) == []
    assert built_kernel.kernel_release.startswith("6.1.")
    vmlinux = entry / "vmlinux"
    assert vmlinux.stat().st_size == built_kernel.vmlinux_bytes
    notes = _elf_notes(vmlinux)
    assert any(n == b"Xen" and t == XEN_ELFNOTE_PHYS32_ENTRY for n, t, _ in notes), (
        "vmlinux has no PVH entry note"
    )


@pytest.mark.timeout(1800)
def test_second_build_is_a_cache_hit(built_kernel: KernelManifest) -> None:
    again = kernel_build.build_kernel(load_settings().cache_dir)
    assert again == built_kernel


@pytest.mark.timeout(1800)
def test_cli_lists_and_verifies_the_kernel(built_kernel: KernelManifest) -> None:
    listed = subprocess.run(
        [TARTARUS, "kernel", "list", "--json"], capture_output=True, text=True, check=True
    )
    assert built_kernel.id in [k["id"] for k in json.loads(listed.stdout)]
    verified = subprocess.run(
        [TARTARUS, "kernel", "verify", built_kernel.id, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["ok"] and report["failures"] == []


def test_verify_fails_a_weak_config(tmp_path: Path) -> None:
    weak = tmp_path / "config"
    weak.write_text("CONFIG_STRICT_KERNEL_RWX=y\nCONFIG_DEVMEM=y\n")
    proc = subprocess.run(
        [TARTARUS, "kernel", "verify", "--config", str(weak), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    names = {f["option"]["name"] for f in report["failures"]}
    assert "CONFIG_DEVMEM" in names and "CONFIG_RANDOMIZE_BASE" in names
    assert "CONFIG_STRICT_KERNEL_RWX" not in names


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KernelBuildError, match=r"linux-source-6\.1"):
        kernel_build.build_kernel(tmp_path, source=tmp_path / "nope.tar.xz")
    proc = subprocess.run(
        [TARTARUS, "kernel", "build", "--source", str(tmp_path / "nope.tar.xz")],
        capture_output=True,
        text=True,
        check=False,
        env={"TARTARUS_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1
    assert "linux-source-6.1" in proc.stderr


def test_list_skips_broken_entries(tmp_path: Path) -> None:
    root = kernel_build.kernels_dir(tmp_path)
    (root / "deadbeef").mkdir(parents=True)
    (root / "deadbeef" / "manifest.json").write_text("{not json")
    assert kernel_build.list_kernels(tmp_path) == []
    with pytest.raises(kernel_build.KernelNotFoundError, match="kernel list"):
        kernel_build.find_kernel(tmp_path, "dead")


def test_inputs_hash_changes_with_the_fragments() -> None:
    _require_source()
    inputs = kernel_build.compute_inputs()
    changed = msgspec.structs.replace(inputs, fragments_sha256="0" * 64)
    assert inputs.kernel_id() != changed.kernel_id()
    assert inputs.kernel_id() == kernel_build.compute_inputs().kernel_id()
