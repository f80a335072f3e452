"""The wheel `make` builds installs into a clean virtualenv and works there."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import pytest

from tartarus.paths import default_cache_dir
from tests.conftest import REPO_ROOT, require_binary


def _built_wheel() -> Path:
    wheels = sorted((REPO_ROOT / "dist").glob("tartarus-*.whl"))
    if not wheels:
        pytest.skip("no wheel in dist/ (make install builds it)")
    return wheels[-1]


@pytest.mark.timeout(600)
def test_wheel_installs_into_clean_venv_and_doctor_runs(tmp_path: Path) -> None:
    wheel = _built_wheel()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
        timeout=540,
    )
    # Run from an unrelated directory so nothing from the checkout can be imported.
    proc = subprocess.run(
        [env_dir / "bin" / "tartarus", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    report = json.loads(proc.stdout)
    assert report["tartarus_version"]
    assert {b["name"] for b in report["backends"]} == {"microvm", "gvisor", "jail", "wasm"}
    located = subprocess.run(
        [
            python,
            "-c",
            "from tartarus.binaries import find_binary; print(find_binary('tartarus-agent'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(located).is_relative_to(env_dir)
    assert sys.prefix not in located


# -- the wheel's platform tag ---------------------------------------------------------

MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_x86_64|manylinux(2014)_x86_64")


def _glibc_floor(wheel: Path) -> tuple[int, int]:
    """The lowest glibc a wheel's platform tags promise to run on."""
    platform_tags = wheel.stem.split("-")[-1].split(".")
    floors = []
    for tag in platform_tags:
        m = MANYLINUX.fullmatch(tag)
        if m is None:
            pytest.fail(f"{wheel.name}: platform tag {tag} is not a manylinux tag")
        floors.append((2, 17) if m.group(3) else (int(m.group(1)), int(m.group(2))))
    return min(floors)


def _glibc_versions(elf: Path) -> set[tuple[int, int]]:
    out = subprocess.run(
        ["objdump", "-T", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    return {(int(a), int(b)) for a, b in re.findall(r"GLIBC_(\d+)\.(\d+)", out)}


def test_wheel_is_manylinux_and_its_extension_needs_no_newer_glibc(tmp_path: Path) -> None:
    """maturin's audit tags the wheel; this re-checks the tag against the symbols the
    extension imports, and that the bundled programs are static (no ELF interpreter)."""
    require_binary("objdump")
    wheel = _built_wheel()
    assert wheel.name.split("-")[2:4] == ["cp311", "abi3"], wheel.name
    floor = _glibc_floor(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (extension,) = [n for n in names if re.fullmatch(r"tartarus/_core\.abi3\.so", n)]
        programs = [n for n in names if n.startswith("tartarus/_bin/")]
        for name in (extension, *programs):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(z.read(name))
    needed = _glibc_versions(tmp_path / extension)
    assert needed, "the extension imports no versioned glibc symbols: not a glibc build?"
    assert max(needed) <= floor, f"needs GLIBC_{max(needed)} but is tagged {floor}"
    assert {Path(p).name for p in programs} == {"tartarus-agent", "tartarus-vmm", "tartarus-jail"}
    for program in programs:
        headers = subprocess.run(
            ["objdump", "-p", str(tmp_path / program)], capture_output=True, text=True, check=True
        ).stdout
        assert "INTERP" not in headers and "NEEDED" not in headers, program


# -- the sdist ------------------------------------------------------------------------


def _build_sdist(out: Path) -> Path:
    """The sdist, made by our build backend (what `pip`/`build` call for an sdist)."""
    code = (
        "import sys; sys.path.insert(0, 'build_backend'); import tartarus_build; "
        "print(tartarus_build.build_sdist(sys.argv[1]))"
    )
    # maturin's Python module runs the `maturin` program installed beside this Python.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return out / proc.stdout.strip().splitlines()[-1]


def _repo_files(*tops: str) -> set[str]:
    out = set()
    for top in tops:
        for path in (REPO_ROOT / top).rglob("*"):
            built = {"__pycache__", "_bin"} & set(path.parts) or path.suffix in (".so", ".pyc")
            if path.is_file() and not built:
                out.add(path.relative_to(REPO_ROOT).as_posix())
    return out


def test_sdist_carries_everything_a_build_needs(tmp_path: Path) -> None:
    sdist = _build_sdist(tmp_path)
    assert sdist.name.endswith(".tar.gz"), sdist
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
        prefix = members[0].split("/")[0]
        manifest = tar.extractfile(f"{prefix}/Cargo.toml")
        assert manifest is not None
        # Every workspace member, also those only the backend builds (the agent).
        assert manifest.read() == (REPO_ROOT / "Cargo.toml").read_bytes()
    inside = {m.removeprefix(f"{prefix}/") for m in members}
    wanted = {
        "pyproject.toml",
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
        "build_backend/tartarus_build.py",
        *_repo_files("rust", "python"),
    }
    assert not wanted - inside, f"missing from {sdist.name}: {sorted(wanted - inside)}"
    assert "rust/vmm/guests/probe.S" in inside
    assert not [m for m in inside if "/_bin/" in m or m.endswith(".so")], "built files leaked"


SDIST_BUILD = default_cache_dir() / "sdist-build"


def _sync_changed(new: Path, cached: Path) -> None:
    """Makes `cached` hold `new`'s files, rewriting only those whose bytes differ.

    maturin stamps every file of an sdist with one old date, so cargo cannot tell
    changed sources by their mtime. A rewritten file gets the present time (cargo
    rebuilds its crate); an unchanged one keeps its old time (cargo reuses the cached
    build), so only the crates that changed since the last run compile again."""
    cached.mkdir(parents=True, exist_ok=True)
    keep = set()
    for path in new.rglob("*"):
        rel = path.relative_to(new)
        keep.add(rel)
        dest = cached / rel
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif not dest.is_file() or dest.read_bytes() != path.read_bytes():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
            dest.chmod(path.stat().st_mode & 0o777)
    for path in sorted(cached.rglob("*"), reverse=True):
        if path.relative_to(cached) not in keep:
            path.rmdir() if path.is_dir() else path.unlink()


@pytest.mark.timeout(3600)
def test_wheel_builds_from_the_sdist_and_imports(tmp_path: Path) -> None:
    """`pip wheel` from the unpacked sdist, as a user without our checkout would run it.
    Cargo's target directory is a cache, and the sdist's files are kept at one place
    between runs (`_sync_changed`), so a run compiles only the crates that changed."""
    require_binary("cargo")
    sdist = _build_sdist(tmp_path)
    SDIST_BUILD.mkdir(parents=True, exist_ok=True)
    with (SDIST_BUILD / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        unpacked = tmp_path / "unpacked"
        with tarfile.open(sdist) as tar:
            tar.extractall(unpacked, filter="data")
        (top,) = unpacked.iterdir()
        src = SDIST_BUILD / "src"
        _sync_changed(top, src)
        # Build isolation, as a user's `pip wheel` has: the build requirements come from
        # the index, not from our .venv.
        env = {**os.environ, "CARGO_TARGET_DIR": str(SDIST_BUILD / "target")}
        start = time.monotonic()
        uv = REPO_ROOT / ".tools" / "bin" / "uv"
        subprocess.run(
            [uv, "build", "--quiet", "--wheel", src, "--out-dir", tmp_path / "out"],
            check=True,
            env=env,
            cwd=tmp_path,
            timeout=3500,
        )
        built_in = time.monotonic() - start
    (wheel,) = (tmp_path / "out").glob("tartarus-*.whl")
    assert _glibc_floor(wheel) == _glibc_floor(_built_wheel()), wheel.name
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", wheel],
        check=True,
        timeout=300,
    )
    # No dependencies installed: the extension and the bundled programs stand alone.
    junk = tmp_path / "not-a-snapshot"
    junk.write_bytes(b"\0" * 4096)
    check = (
        "import sys, subprocess, pathlib, tartarus, tartarus._core as c\n"
        "try:\n"
        "    c.inspect_snapshot(sys.argv[1])\n"
        "except c.SnapshotError as e:\n"
        "    print('snapshot-error', e)\n"
        "agent = pathlib.Path(tartarus.__file__).parent / '_bin' / 'tartarus-agent'\n"
        "print(subprocess.run([agent, '--version'], capture_output=True, text=True).stdout)\n"
        "print(tartarus.__version__)\n"
    )
    out = subprocess.run(
        [python, "-c", check, junk], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "snapshot-error" in out, out
    assert "tartarus-agent" in out, out
    print(f"wheel from sdist built in {built_in:.0f} s")
