"""Configuration: `tartarus.toml` plus `TARTARUS_*` environment variables.

Zero configuration works: every field has a default. A file is read from
`$TARTARUS_CONFIG`, else `./tartarus.toml`, else `~/.config/tartarus/tartarus.toml`.
Environment variables override the file: `TARTARUS_CACHE_DIR=/x` sets `cache_dir`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from tartarus import codec, paths
from tartarus.auth.settings import AuthSettings
from tartarus.errors import ConfigError
from tartarus.fleet.settings import FleetSettings
from tartarus.network.settings import NetworkSettings
from tartarus.runtime.vmm_jail import VmmJailSettings
from tartarus.secrets.settings import SecretsSettings


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every setting Tartarus reads; each field documents itself in docs/configuration.md."""

    cache_dir: Path = msgspec.field(default_factory=paths.default_cache_dir)
    state_dir: Path = msgspec.field(default_factory=paths.default_state_dir)
    runtime_dir: Path = msgspec.field(default_factory=paths.default_runtime_dir)
    # The runsc the gvisor backend runs; unset: the pinned build `tartarus runsc install`
    # caches, else runsc on PATH.
    runsc: Path | None = None
    # How long a microVM may take from its VMM starting to its agent answering (boot, or
    # a restore). Raise it where guests boot slowly, e.g. under nested emulation.
    guest_ready_timeout_s: float = msgspec.field(default=60.0)
    # Extra guest kernel arguments for every microVM (e.g. `loglevel=7` to see its boot
    # messages: under nested emulation each console byte costs a VM exit).
    guest_kernel_args: str = ""
    # Cerberus: authentication ([auth], docs/auth.md).
    auth: AuthSettings = msgspec.field(default_factory=AuthSettings)
    # Secret providers ([secrets], docs/auth.md).
    secrets: SecretsSettings = msgspec.field(default_factory=SecretsSettings)
    # The microVM monitor's own jail ([vmm_jail], docs/configuration.md).
    vmm_jail: VmmJailSettings = msgspec.field(default_factory=VmmJailSettings)
    # Many hosts: scheduling, queue and heartbeat settings of `serve --state` (docs/fleet.md).
    fleet: FleetSettings = msgspec.field(default_factory=FleetSettings)
    # Sandbox networks (Styx): the address pool of sandbox links ([network],
    # docs/configuration.md).
    network: NetworkSettings = msgspec.field(default_factory=NetworkSettings)
    # Warm pools (Nyx): template -> ready sandboxes to keep (`[warm_pools]` table; the
    # API's `PUT /v1/pools/{template}` overrides it).
    warm_pools: dict[str, int] = msgspec.field(default_factory=dict)
    # How long a paused sandbox waits for a resume before it is deleted (its snapshot
    # with it); 0 keeps paused sandboxes until someone deletes them.
    paused_retention_s: float = msgspec.field(default=7 * 24 * 3600.0)

    def __post_init__(self) -> None:
        if not 0 <= self.paused_retention_s <= 10 * 365 * 24 * 3600:
            raise ValueError("paused_retention_s: seconds, 0 (keep them) or up to ten years")
        args = self.guest_kernel_args
        # `--` would hand the rest to the guest's init (our agent), not to the kernel.
        if "--" in args.split() or any(c in args for c in "\n\r\0") or len(args) > 1024:
            raise ValueError(
                "guest_kernel_args: kernel arguments on one line, at most 1024 characters, "
                "without `--`"
            )


ENV_PREFIX = "TARTARUS_"


def config_file_candidates() -> list[Path]:
    explicit = os.environ.get("TARTARUS_CONFIG")
    if explicit:
        return [Path(explicit)]
    home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [Path.cwd() / "tartarus.toml", home / "tartarus" / "tartarus.toml"]


def _from_env() -> dict[str, Any]:
    fields = set(Settings.__struct_fields__)
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            name = key.removeprefix(ENV_PREFIX).lower()
            if name in fields:
                out[name] = value
    return out


def load_settings() -> Settings:
    """Reads the first config file that exists, then applies environment overrides."""
    raw: dict[str, Any] = {}
    for candidate in config_file_candidates():
        if candidate.is_file():
            try:
                raw = tomllib.loads(candidate.read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ConfigError(f"{candidate}: {e}") from e
            source = str(candidate)
            break
    else:
        source = "defaults"
    raw.update(_from_env())
    try:
        return codec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration ({source} and TARTARUS_* env): {e}") from e
