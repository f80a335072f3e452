"""Compatibility on microvm: a short subset of the rows tests/test_compat.py runs on jail
and gvisor, each in a Linux guest booted by `tartarus-vmm` from the `python` template's
ext4 image, the way the server starts one. `kvm_full`: on this project's CI machines it
runs inside the nested-KVM lane, where a boot takes seconds, hence the subset: coreutils,
ps, sockets, locks, inotify, /proc, signals and timeouts. The rows are the same objects
the other backends run, so a command that works there and not here fails here."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tartarus.config import load_settings
from tartarus.images import ResolvedTemplate
from tartarus.runtime.base import Sandbox
from tests.support.compat import (
    CASES,
    CompatCase,
    missing_programs,
    run_case,
    started_from_template,
)
from tests.support.images import shared_template

pytestmark = [pytest.mark.kvm_full, pytest.mark.anyio, pytest.mark.timeout(300)]

SUBSET = (
    "ls",
    "stat",
    "find",
    "cp-a",
    "df",
    "ps",
    "unix-socket",
    "fcntl-locks",
    "inotify",
    "proc-self",
    "signals",
    "timeout",
)
ROWS = [case for case in CASES if case.name in SUBSET]


@pytest.fixture(scope="module")
def python_template() -> ResolvedTemplate:
    """The built-in `python` template with its ext4 image, as `make artefacts` built it."""

    return shared_template("python", ext4=True)


@pytest.fixture
async def sandbox(
    case: CompatCase,
    python_template: ResolvedTemplate,
    guest_kernel: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Sandbox]:
    assert not missing_programs(python_template.rootfs, case), "the subset needs no extras"
    monkeypatch.setenv("TARTARUS_RUNTIME_DIR", str(tmp_path / "run"))
    from tartarus.runtime.microvm import MicroVmRuntime  # noqa: PLC0415 - kvm hosts only

    runtime = MicroVmRuntime(kernel=guest_kernel, settings=load_settings())
    async with started_from_template(
        runtime, python_template, f"compat-{case.name}-{os.getpid()}", rootfs=None
    ) as sb:
        yield sb


def test_the_subset_names_real_rows() -> None:
    assert sorted(c.name for c in ROWS) == sorted(SUBSET)


@pytest.mark.parametrize("case", ROWS, ids=lambda c: c.name)
async def test_command(case: CompatCase, sandbox: Sandbox) -> None:
    await run_case(sandbox, case)
