"""Bundled binaries are found inside the installed package, with clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import tartarus
from tartarus.binaries import find_binary
from tartarus.errors import BinaryNotFoundError
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize("name", ["tartarus-agent", "tartarus-vmm"])
def test_bundled_binary_lives_in_installed_package(name: str) -> None:
    path = find_binary(name)
    package_dir = Path(tartarus.__file__).resolve().parent
    assert path.resolve().is_relative_to(package_dir)
    assert not path.resolve().is_relative_to(REPO_ROOT / "python")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(name)


def test_bundled_binaries_are_static() -> None:
    # Static binaries run inside any rootfs and in the VMM's empty chroot.
    data = find_binary("tartarus-agent").read_bytes()
    assert b"/lib64/ld-linux" not in data[:4096]


def test_env_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "agent"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TARTARUS_AGENT_BIN", str(fake))
    assert find_binary("tartarus-agent") == fake


def test_missing_binary_names_every_place_searched(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BinaryNotFoundError) as info:
        find_binary("tartarus-nope")
    message = str(info.value)
    assert "TARTARUS_NOPE_BIN" in message
    assert "_bin" in message
    assert "$PATH" in message
    assert str(Path(sys.executable).parent) in message
