"""PEP 517 backend: maturin, plus the Rust binaries that ship inside the wheel.

maturin builds the `tartarus._core` extension. The package also runs standalone
programs (`tartarus-agent`, `tartarus-vmm`); they are built here as static executables
and copied into `python/tartarus/_bin/`, so the wheel carries them and the installed
package finds them beside its own modules.

The extension is linked with zig (PyPI's `ziglang`) for a manylinux2014 wheel; the
binaries are static, so they carry no glibc requirement of their own.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tomllib
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


def with_zig(config_settings: dict[str, Any] | None) -> dict[str, Any]:
    """maturin's arguments plus `--zig` and `[tool.maturin] compatibility`.

    zig links the extension against the glibc symbol versions of that floor
    (manylinux2014: glibc 2.17) whatever glibc the build host has, and maturin's
    auditwheel checks the result and tags the wheel. maturin's PEP 517 hook would
    otherwise pass `--compatibility off`: a plain `linux` tag no index accepts.
    """
    args = list(maturin.get_maturin_pep517_args(config_settings))
    if "--compatibility" not in args and "--manylinux" not in args:
        with (ROOT / "pyproject.toml").open("rb") as f:
            compatibility = tomllib.load(f)["tool"]["maturin"]["compatibility"]
        args = ["--compatibility", compatibility, *args]
    if "--zig" not in args:
        args = ["--zig", *args]
    return {**(config_settings or {}), "maturin.build-args": args}


def build_wheel(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build_binaries()
    settings = with_zig(config_settings)
    return str(maturin.build_wheel(wheel_directory, settings, metadata_directory))


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    build_binaries()
    settings = with_zig(config_settings)
    return str(maturin.build_editable(wheel_directory, settings, metadata_directory))


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    """maturin's sdist with the workspace manifest as it is in the checkout.

    maturin trims `[workspace] members` to the extension's crate and its path
    dependencies, which drops `tartarus-agent` and `tartarus-proto`; `build_binaries`
    builds the agent from the workspace, so the sdist keeps every member (`rust/` is
    included whole by `[tool.maturin] include`).
    """
    name = str(maturin.build_sdist(sdist_directory, config_settings))
    _restore_workspace_manifest(Path(sdist_directory) / name)
    return name


def _restore_workspace_manifest(sdist: Path) -> None:
    manifest = (ROOT / "Cargo.toml").read_bytes()
    rewritten = sdist.with_name(sdist.name + ".tmp")
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(rewritten, "w:gz") as dst:
        top = src.getnames()[0].split("/")[0]
        for member in src.getmembers():
            if member.name == f"{top}/Cargo.toml":
                member.size = len(manifest)
                dst.addfile(member, io.BytesIO(manifest))
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    rewritten.replace(sdist)


get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
get_requires_for_build_editable = maturin.get_requires_for_build_editable
prepare_metadata_for_build_wheel = maturin.prepare_metadata_for_build_wheel
prepare_metadata_for_build_editable = maturin.prepare_metadata_for_build_editable
