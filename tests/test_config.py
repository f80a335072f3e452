"""Configuration: defaults, file, environment, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.config import load_settings
from tartarus.errors import ConfigError
from tartarus.runtime.microvm import AGENT_CMDLINE, DEFAULT_CMDLINE, guest_cmdline


def test_zero_config_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    settings = load_settings()
    assert settings.cache_dir == tmp_path / "cache" / "tartarus"


def test_file_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tartarus.toml"
    config.write_text('cache_dir = "/srv/cache"\nstate_dir = "/srv/state"\n')
    monkeypatch.setenv("TARTARUS_CONFIG", str(config))
    monkeypatch.setenv("TARTARUS_STATE_DIR", "/override/state")
    settings = load_settings()
    assert settings.cache_dir == Path("/srv/cache")
    assert settings.state_dir == Path("/override/state")


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("cache_dir = [", "tartarus.toml"),
        ("no_such_setting = 1", "no_such_setting"),
        ("cache_dir = 5", "cache_dir"),
        ("paused_retention_s = -1", "paused_retention_s"),
        ("paused_retention_s = 1e12", "paused_retention_s"),
        ('paused_retention_s = "a week"', "paused_retention_s"),
    ],
)
def test_bad_config_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str, needle: str
) -> None:
    config = tmp_path / "tartarus.toml"
    config.write_text(content)
    monkeypatch.setenv("TARTARUS_CONFIG", str(config))
    with pytest.raises(ConfigError, match=needle):
        load_settings()


@pytest.mark.parametrize(
    "args", ["-- serve", "loglevel=7\ninit=/bin/sh", "x" * 1025, "a\rb"], ids=repr
)
def test_guest_kernel_args_cannot_reach_init_or_break_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TARTARUS_GUEST_KERNEL_ARGS", args)
    with pytest.raises(ConfigError, match="guest_kernel_args"):
        load_settings()


def test_guest_kernel_args_go_between_ours_and_the_agents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TARTARUS_GUEST_KERNEL_ARGS", "loglevel=7")
    line = guest_cmdline(load_settings().guest_kernel_args)
    kernel, _, init = line.partition(" -- ")
    assert kernel.startswith(DEFAULT_CMDLINE)
    assert "loglevel=7" in kernel.split()
    assert "loglevel" not in init
    assert guest_cmdline() == f"{DEFAULT_CMDLINE} {AGENT_CMDLINE}"
