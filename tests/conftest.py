"""Shared fixtures: the doctor's report (probed once per session) and KVM gating.

Tests run against the installed package (the wheel `make test` builds), never the
source tree: `python/` is deliberately not on sys.path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import anyio
import hypothesis
import pytest

from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport, run_doctor
from tests.support.redis_server import RedisServer, redis_server
from tests.support.server import Server, processes_mentioning, require_backend, running_server

REPO_ROOT = Path(__file__).resolve().parent.parent

# Properties are about behaviour, not speed: a per-example deadline only turns a busy
# CI machine into a flaky failure. Tests that want fewer or more examples still say so.
hypothesis.settings.register_profile("tartarus", deadline=None)
hypothesis.settings.load_profile("tartarus")


@pytest.fixture(scope="session")
def doctor_report() -> DoctorReport:
    return run_doctor(load_settings())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips `kvm_full` tests with the doctor's measured reason on hosts without full KVM."""
    if not any(item.get_closest_marker("kvm_full") for item in items):
        return
    report = run_doctor(load_settings())
    if report.kernel.kvm.full_guests:
        return
    reason = (
        f"host KVM cannot run a full guest (doctor probe: flavour={report.kernel.kvm.flavour}, "
        f"{report.kernel.kvm.exit})"
    )
    for item in items:
        if item.get_closest_marker("kvm_full"):
            item.add_marker(pytest.mark.skip(reason=reason))


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root (euid is {os.geteuid()})")


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not on PATH (make test installs it with apt-get)")
    return path


@pytest.fixture(scope="session")
def guest_kernel() -> Path:
    """The guest kernel (`vmlinux`, serial console on ttyS0) that `tartarus kernel build`
    caches: found in the cache, built on first use. `$TARTARUS_TEST_KERNEL` overrides it
    with another vmlinux. Only `kvm_full` tests use it, and those are skipped at
    collection on hosts without full KVM, so such a host never builds it."""
    if override := os.environ.get("TARTARUS_TEST_KERNEL"):
        return Path(override)
    from tartarus.guest import kernel_build  # noqa: PLC0415

    cache_dir = load_settings().cache_dir
    manifest = kernel_build.build_kernel(cache_dir)
    return kernel_build.kernel_dir(cache_dir, manifest.id) / "vmlinux"


@pytest.fixture(scope="session")
def base_rootfs() -> Path:
    """The `base` template's root filesystem (busybox), built once by the image store
    and cached under the user's cache directory like any template."""
    from tartarus.images import TemplateStore  # noqa: PLC0415

    async def resolve() -> Path:
        return (await TemplateStore().resolve("base", ext4=False)).rootfs

    return anyio.run(resolve)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the module's tests (each keeps to its own keys)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `tartarus serve` (real backend) for the suites that use it only as
    clients do (MCP, the E2B compat module, the examples): they build their templates
    once per worker rather than once per module."""
    require_backend()
    base = tmp_path_factory.mktemp("shared")
    with running_server(base) as server:
        yield server
    assert processes_mentioning(str(base)) == []
