"""The wheel `make` builds installs into a clean virtualenv and works there."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


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
