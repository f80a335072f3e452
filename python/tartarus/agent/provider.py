"""The node agent's `RuntimeProvider` over this host's backends.

The doctor's report is taken once, when the first sandbox needs a backend (it runs real
probes: a KVM guest, a runsc container), then reused.
"""

from __future__ import annotations

import importlib
from typing import Any

import anyio

from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport, run_doctor
from tartarus.runtime.base import BackendUnavailableError, Runtime
from tartarus.runtime.types import SandboxSpec


class HostRuntimes:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._report: DoctorReport | None = None
        self._lock = anyio.Lock()

    async def report(self) -> DoctorReport:
        async with self._lock:
            if self._report is None:
                self._report = await anyio.to_thread.run_sync(run_doctor, self.settings)
            return self._report

    def _selector(self) -> Any:
        try:
            return importlib.import_module("tartarus.runtime.selector")
        except ModuleNotFoundError as e:
            raise BackendUnavailableError(
                "this build of tartarus has no sandbox backends (tartarus.runtime.selector "
                "is missing)"
            ) from e

    async def prepare(self, spec: SandboxSpec) -> SandboxSpec:
        return spec

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        selector = self._selector()
        runtime, reason = selector.select(spec, await self.report(), self.settings)
        return runtime, str(reason)

    async def all_runtimes(self) -> list[Runtime]:
        runtimes: list[Runtime] = self._selector().available_runtimes(
            await self.report(), self.settings
        )
        return runtimes

    async def describe(self) -> dict[str, str]:
        if self._report is None:
            return {}
        return {
            b.name: ("available" if b.available else "unavailable") + f": {b.reason}"
            for b in self._report.backends
        }
