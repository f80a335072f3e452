"""The Linux backends the sandbox suites run on: a parametrised `backend` fixture's values,
each skipped with the doctor's measured reason where this host cannot run it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.runtime.base import Sandbox
from tartarus.runtime.types import Backend

S = TypeVar("S", bound=Sandbox)

LINUX_BACKENDS = [Backend.JAIL, Backend.GVISOR]


def available_backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    value: Backend = request.param
    verdict = doctor_report.backend(value.value)
    if not verdict.available:
        pytest.skip(f"{value.value} cannot run here: {verdict.reason}")
    return value


@contextlib.asynccontextmanager
async def started(sandbox: S) -> AsyncIterator[S]:
    """`sandbox` (just created) started, and killed on the way out."""
    await sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.kill()
