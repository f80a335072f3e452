"""Helpers for the Erebus tests: stores in tmp dirs, and running a built rootfs under
gVisor with a hand-written OCI bundle. The runsc is the one the gvisor backend runs (the
`runsc` setting, the pinned build, then PATH: tartarus.host.runsc), on the platform its
probe picks, never whichever `runsc` PATH has first."""

from __future__ import annotations

import functools
import subprocess
import uuid
from pathlib import Path

import anyio
import pytest

from tartarus.config import Settings, load_settings
from tartarus.host.runsc import (
    RunscError,
    global_flags,
    probe_platform,
    resolve_runsc,
    unmount_null_netns,
)
from tartarus.images import ResolvedTemplate
from tartarus.images.store import TemplateStore
from tartarus.runtime.oci_spec import Process, Root, Spec, write_bundle_config
from tests.conftest import require_root


def tmp_store(root: Path) -> TemplateStore:
    return TemplateStore(
        Settings(cache_dir=root / "cache", state_dir=root / "state", runtime_dir=root / "run")
    )


def shared_store() -> TemplateStore:
    """The user's store (~/.cache/tartarus, ~/.local/share/tartarus): built-in templates
    are built once per machine and shared, which is what the cache is for."""
    return TemplateStore(load_settings())


def shared_template(template: str, *, ext4: bool) -> ResolvedTemplate:
    """A built-in template from the shared store (built on first use), for sync fixtures."""
    return anyio.run(functools.partial(shared_store().resolve, template, ext4=ext4))


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


@functools.cache
def _runsc() -> tuple[str, str]:
    settings = load_settings()
    found = resolve_runsc(settings.runsc, settings.cache_dir)
    return found.path, probe_platform(found.path).name


def runsc_command(state: Path, *args: str) -> list[str]:
    """`runsc <flags> args...` with the gvisor backend's runsc and platform."""
    try:
        runsc, platform = _runsc()
    except RunscError as e:
        pytest.skip(str(e))
    return [runsc, *global_flags(state, platform), *args]


def runsc_argv(bundle: Path, container: str) -> list[str]:
    require_root()
    return runsc_command(bundle / "state", "run", "--bundle", str(bundle), container)


def runsc_delete(bundle: Path, container: str) -> None:
    subprocess.run(
        runsc_command(bundle / "state", "delete", "--force", container),
        capture_output=True,
        check=False,
        timeout=60,
    )
    # Current runsc pins an empty netns under its root for --network=none sandboxes.
    unmount_null_netns(bundle / "state")


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
