"""PEP 517 backend: maturin, plus the Rust binaries that ship inside the wheel.

maturin builds the `tartarus._core` extension. The package also runs standalone
programs (`tartarus-agent`, `tartarus-vmm`); they are built here as static executables
and copied into `python/tartarus/_bin/`, so the wheel carries them and the installed
package finds them beside its own modules.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import maturin

ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = ROOT / "python" / "tartarus" / "_bin"
BINARIES = ("tartarus-agent", "tartarus-vmm", "tartarus-jail")


def _host_triple() -> str:
    out = subprocess.run(["rustc", "-vV"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("host: "):
            return line.removeprefix("host: ").strip()
    raise RuntimeError("rustc -vV printed no host triple")


def build_binaries() -> None:
    """Builds the static binaries and copies them into the package's _bin directory."""
    triple = _host_triple()
    env = dict(os.environ)
    # Static binaries run inside any rootfs and inside the VMM's empty chroot. An
    # explicit --target keeps these flags off build scripts and proc-macros.
    env["RUSTFLAGS"] = (env.get("RUSTFLAGS", "") + " -C target-feature=+crt-static").strip()
    cmd = ["cargo", "build", "--release", "--target", triple]
    for name in BINARIES:
        cmd += ["--bin", name]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    target_dir = Path(env.get("CARGO_TARGET_DIR", ROOT / "target"))
    BIN_DIR.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        shutil.copy2(target_dir / triple / "release" / name, BIN_DIR / name)


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build_binaries()
    return str(maturin.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build_binaries()
    return str(maturin.build_editable(wheel_directory, config_settings, metadata_directory))


build_sdist = maturin.build_sdist
get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
get_requires_for_build_editable = maturin.get_requires_for_build_editable
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable
