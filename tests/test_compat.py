"""Compatibility: the everyday commands of tests/support/compat.py, from the `python`
template, in every agent-backed Linux backend here (jail, gvisor). A command that runs on
one backend and not on another fails there: the backend is what gets fixed, the row is
not skipped. Only a program missing from the template (the same on every backend) or a
backend that cannot run on this host skips, with the reason."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport
from tartarus.images import ResolvedTemplate
from tartarus.runtime.base import Runtime, Sandbox
from tartarus.runtime.gvisor import GvisorRuntime
from tartarus.runtime.jail import JailRuntime
from tartarus.runtime.types import Backend
from tests.support.backends import LINUX_BACKENDS, available_backend
from tests.support.compat import (
    CASES,
    GIT_NOT_IN_TEMPLATE,
    CompatCase,
    missing_programs,
    run_case,
    started_from_template,
)
from tests.support.images import shared_template

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def python_template() -> ResolvedTemplate:
    """The built-in `python` template, built once per machine into the shared cache."""

    return shared_template("python", ext4=False)


@pytest.fixture(params=LINUX_BACKENDS, ids=lambda b: b.value)
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    return available_backend(request, doctor_report)


@pytest.fixture
def runtime(backend: Backend, tmp_path: Path) -> Iterator[Runtime]:
    rt: Runtime = JailRuntime(tmp_path / "state")
    if backend is Backend.GVISOR:
        # The runsc the server would run: the `runsc` setting (TARTARUS_RUNSC) counts.
        settings = load_settings()
        rt = GvisorRuntime(tmp_path / "state", runsc=settings.runsc, cache_dir=settings.cache_dir)
    yield rt
    if isinstance(rt, JailRuntime):
        rt.remove_cgroup_scope()


@pytest.fixture
def runnable(case: CompatCase, python_template: ResolvedTemplate) -> CompatCase:
    """`case`, skipped when the template lacks a program it needs (on every backend)."""
    missing = missing_programs(python_template.rootfs, case)
    if missing:
        reason = GIT_NOT_IN_TEMPLATE if missing == ["git"] else "not in the python template"
        pytest.skip(f"{case.name} needs {', '.join(missing)}: {reason}")
    return case


@pytest.fixture
async def sandbox(
    runnable: CompatCase, runtime: Runtime, python_template: ResolvedTemplate
) -> AsyncIterator[Sandbox]:
    try:
        async with started_from_template(
            runtime, python_template, "compat", rootfs=python_template.rootfs
        ) as sb:
            yield sb
    finally:
        await runtime.reap(set())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
async def test_command(case: CompatCase, sandbox: Sandbox) -> None:
    await run_case(sandbox, case)
