"""The kernel build driver on a stand-in source tree (seconds, not minutes).

The stand-in is a tarball with a Makefile and merge_config.sh that behave like the
kernel's for the targets the driver runs (tinyconfig, olddefconfig, vmlinux,
kernelrelease), so the driver's steps, checks, progress, locking and failure handling
are tested here; test_kernel_build.py builds the real kernel.
"""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

from tartarus.guest import kernel_build, kernel_config
from tartarus.guest.kernel_build import BuildProgress, KernelBuildError

MAKEFILE = """\
tinyconfig:
\tprintf 'CONFIG_64BIT=y\\n' > .config
olddefconfig:
\tif [ -n "$$FAKE_DROP" ]; then grep -v "^$$FAKE_DROP=" .config > .c && mv .c .config; fi
vmlinux:
\tfor i in 1 2 3 4 5; do echo "  CC      fake/file$$i.o"; done
\t@if [ -n "$$FAKE_FAIL" ]; then echo "fake/file6.c: error: boom"; exit 2; fi
\tcp /bin/true vmlinux
kernelrelease:
\t@echo 6.1.999-fake
"""
MERGE = '#!/bin/sh\n# merge_config.sh -m BASE FRAGMENT\ncat "$3" >> "$2"\n'


def _fake_source(path: Path) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, text, mode in (
            ("linux-fake/Makefile", MAKEFILE, 0o644),
            ("linux-fake/scripts/kconfig/merge_config.sh", MERGE, 0o755),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_runs_every_step_and_caches_the_result(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "linux-source.tar.xz")
    events: list[BuildProgress] = []
    manifest = kernel_build.build_kernel(tmp_path / "cache", source=source, progress=events.append)
    assert manifest.kernel_release == "6.1.999-fake"
    assert manifest.compile_steps == 5
    entry = kernel_build.kernel_dir(tmp_path / "cache", manifest.id)
    assert (entry / "vmlinux").read_bytes() == Path("/bin/true").read_bytes()
    config = kernel_config.read_dotconfig(entry / "config")
    assert kernel_config.check(config, kernel_config.required_options()) == []
    phases = [e.phase for e in events]
    assert phases.index("unpack") < phases.index("configure") < phases.index("compile")
    assert phases[-1] == "install"
    compile_events = [e for e in events if e.phase == "compile"]
    assert "fake/file5.o" in [e.detail for e in compile_events]
    assert compile_events[-1].done == compile_events[-1].total == 5
    # Same inputs: the cache answers, nothing is rebuilt; scratch trees are gone.
    again = kernel_build.build_kernel(
        tmp_path / "cache", source=source, progress=lambda e: pytest.fail(f"rebuilt: {e}")
    )
    assert again == manifest
    assert not list(kernel_build.kernels_dir(tmp_path / "cache").glob(".build-*"))


def test_options_dropped_by_kconfig_stop_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DROP", "CONFIG_VIRTIO_VSOCKETS")
    source = _fake_source(tmp_path / "linux-source.tar.xz")
    with pytest.raises(KernelBuildError, match="CONFIG_VIRTIO_VSOCKETS: want y, have n"):
        kernel_build.build_kernel(tmp_path / "cache", source=source)
    assert kernel_build.list_kernels(tmp_path / "cache") == []


def test_a_failed_compile_leaves_no_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_FAIL", "1")
    source = _fake_source(tmp_path / "linux-source.tar.xz")
    with pytest.raises(KernelBuildError, match="make vmlinux failed"):
        kernel_build.build_kernel(tmp_path / "cache", source=source)
    root = kernel_build.kernels_dir(tmp_path / "cache")
    assert kernel_build.list_kernels(tmp_path / "cache") == []
    assert not list(root.glob(".build-*"))


def test_concurrent_builds_share_one_build(tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "linux-source.tar.xz")
    compiles: list[int] = []
    results: list[kernel_build.KernelManifest] = []

    def build() -> None:
        def progress(e: BuildProgress) -> None:
            if e.phase == "compile" and e.done == 0:
                compiles.append(1)

        results.append(
            kernel_build.build_kernel(tmp_path / "cache", source=source, progress=progress)
        )

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.id for r in results}) == 1
    assert len(compiles) == 1


def test_hostile_source_tarball_cannot_escape(tmp_path: Path) -> None:
    source = tmp_path / "evil.tar.xz"
    with tarfile.open(source, "w:xz") as tar:
        info = tarfile.TarInfo("../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(KernelBuildError, match=r"cannot unpack.*outside"):
        kernel_build.build_kernel(tmp_path / "cache", source=source)
    assert not (tmp_path / "escaped").exists()
    assert not (tmp_path.parent / "escaped").exists()
    garbage = tmp_path / "garbage.tar.xz"
    garbage.write_bytes(b"not a tarball")
    with pytest.raises(KernelBuildError, match="cannot unpack"):
        kernel_build.build_kernel(tmp_path / "cache", source=garbage)


def test_cli_progress_bar_renders_every_phase(tmp_path: Path) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415

    from tartarus.cli.kernel import _Bar  # noqa: PLC0415

    out = io.StringIO()
    source = _fake_source(tmp_path / "linux-source.tar.xz")
    with Progress(console=Console(file=out, force_terminal=True, width=100)) as progress:
        bar = _Bar(progress)
        kernel_build.build_kernel(tmp_path / "cache", source=source, progress=bar)
        progress.refresh()
    text = out.getvalue()
    for phase in ("unpack", "configure", "compile", "install"):
        assert phase in text
    assert all(t.completed == t.total for t in progress.tasks)
