"""Helpers for the Erebus tests: stores in tmp dirs, and running a built rootfs under
gVisor with a hand-written OCI bundle."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

from tartarus.config import Settings, load_settings
from tartarus.host.tools import runsc_global_flags
from tartarus.images.store import TemplateStore
from tartarus.runtime.oci_spec import Process, Root, Spec, write_bundle_config
from tests.conftest import require_binary, require_root


def tmp_store(root: Path) -> TemplateStore:
    return TemplateStore(
        Settings(cache_dir=root / "cache", state_dir=root / "state", runtime_dir=root / "run")
    )


def shared_store() -> TemplateStore:
    """The user's store (~/.cache/tartarus, ~/.local/share/tartarus): built-in templates
    are built once per machine and shared, which is what the cache is for."""
    return TemplateStore(load_settings())


def gvisor_bundle(rootfs: Path, argv: list[str], workdir: Path, env: dict[str, str]) -> Path:
    """A hand-written OCI bundle: `argv` on the read-only `rootfs`."""
    bundle = workdir / f"bundle-{uuid.uuid4().hex[:8]}"
    (bundle / "state").mkdir(parents=True)
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", **env}
    spec = Spec(
        process=Process(args=argv, env=[f"{k}={v}" for k, v in environment.items()], cwd="/"),
        root=Root(path=str(rootfs), readonly=True),
    )
    write_bundle_config(bundle, spec)
    return bundle


def runsc_argv(bundle: Path, container: str) -> list[str]:
    require_root()
    runsc = require_binary("runsc")
    return [runsc, *runsc_global_flags(bundle / "state"), "run", "--bundle", str(bundle), container]


def runsc_delete(bundle: Path, container: str) -> None:
    subprocess.run(
        [
            require_binary("runsc"),
            *runsc_global_flags(bundle / "state"),
            "delete",
            "--force",
            container,
        ],
        capture_output=True,
        check=False,
        timeout=60,
    )


def run_in_gvisor(
    rootfs: Path, argv: list[str], workdir: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `argv` in a throwaway gVisor sandbox whose read-only root is `rootfs`."""
    bundle = gvisor_bundle(rootfs, argv, workdir, env or {})
    container = f"erebus-{uuid.uuid4().hex[:12]}"
    try:
        return subprocess.run(
            runsc_argv(bundle, container), capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        runsc_delete(bundle, container)
