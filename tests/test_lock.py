"""The Python dependencies come from the committed lock, and the lock matches pyproject.

`make` installs .venv with `uv sync --frozen` from uv.lock (hashes checked); these tests
prove that the environment the suite runs in is that lock, and that a lock left behind by
a pyproject change fails with a message naming the command that fixes it.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

UV = REPO_ROOT / ".tools" / "bin" / "uv"
CHECK_LOCK = REPO_ROOT / "scripts" / "check-lock"


def _uv() -> Path:
    # make installs it (requirements/uv.txt); its absence is a broken setup, not a skip.
    assert UV.exists(), f"{UV} is missing: `make install` puts uv there"
    return UV


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> dict[str, set[str]]:
    """Each locked package's versions (more than one where the lock forks on the Python
    version, e.g. numpy for 3.11 and for 3.12+)."""
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        if package["name"] != "tartarus":
            versions.setdefault(_normalise(package["name"]), set()).add(package["version"])
    return versions


def test_the_lock_matches_pyproject() -> None:
    proc = subprocess.run(
        [CHECK_LOCK],
        env={"UV": str(_uv()), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_an_out_of_date_lock_fails_naming_make_lock(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    pyproject = tmp_path / "pyproject.toml"
    text = pyproject.read_text()
    assert '"prometheus-client>=0.20",' in text
    pyproject.write_text(
        text.replace('"prometheus-client>=0.20",', '"prometheus-client>=0.20", "six",')
    )
    proc = subprocess.run(
        [CHECK_LOCK, tmp_path],
        env={"UV": str(_uv()), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "run 'make lock'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_suite_runs_on_exactly_the_locked_versions() -> None:
    locked = _locked()
    strays: dict[str, tuple[str, list[str]]] = {}
    for dist in importlib.metadata.distributions(
        path=[p for p in sys.path if "site-packages" in p]
    ):
        name = _normalise(dist.metadata["Name"])
        if name == "tartarus":
            continue
        if dist.version not in locked.get(name, set()):
            strays[name] = (dist.version, sorted(locked.get(name, set())))
    # pip and setuptools too: `make` creates .venv with uv, which seeds nothing.
    assert not strays, f"installed (version, locked versions) outside the lock: {strays}"
    # And the runtime dependencies really are there.
    for name in ("aiohttp", "msgspec", "anyio", "redis", "wasmtime", "pytest", "mypy"):
        assert importlib.metadata.version(name) in locked[name]


def test_the_package_version_is_the_cargo_workspace_version() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    cargo = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())
    assert pyproject["project"]["version"] == cargo["workspace"]["package"]["version"]


def test_uv_itself_is_pinned_with_hashes() -> None:
    text = (REPO_ROOT / "requirements" / "uv.txt").read_text()
    match = re.search(r"^uv==(\S+) \\$", text, re.MULTILINE)
    assert match, "requirements/uv.txt pins uv==VERSION"
    assert text.count("--hash=sha256:") >= 1
    out = subprocess.run([_uv(), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.split()[1] == match.group(1)


@pytest.mark.parametrize("path", ["Cargo.lock", "uv.lock", "requirements/uv.txt"])
def test_locks_are_committed(path: str) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", path],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
    )
    assert tracked.returncode == 0, f"{path} is not committed"
