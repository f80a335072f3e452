"""A DELETE answers once no code of the sandbox can run (`Sandbox.halt`); the rest of
the teardown (mounts, cgroup, files, the template's hold) follows in the background,
counted by the manager, and leaves nothing behind. Real jail and gVisor sandboxes."""

from __future__ import annotations

import uuid
from pathlib import Path

import anyio
import pytest

from tartarus.api.sandbox import Ending
from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import SYSTEM
from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.node.manager import SandboxManager
from tartarus.node.provider import HostRuntimes
from tartarus.node.store import Store
from tartarus.paths import default_cache_dir
from tartarus.runtime.types import Backend, ExecRequest, SandboxState
from tests.support.server import processes_mentioning, short_dir

pytestmark = pytest.mark.anyio

SIGKILL_BIT = 1 << (9 - 1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def can_run_code(pid: int) -> bool:
    """False for a process that is gone, a zombie, exiting (its memory already let go:
    an empty command line) or has SIGKILL pending: none of those runs another
    instruction of its own."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if not Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip()[:1] in ("Z", "X"):
        return False
    pending = int(fields.get("SigPnd", "0"), 16) | int(fields.get("ShdPnd", "0"), 16)
    return not pending & SIGKILL_BIT


def code_runners(needle: str) -> list[int]:
    return [
        pid
        for pid, cmdline in processes_mentioning(needle)
        if not cmdline.startswith("runsc-gofer")
    ]


@pytest.mark.parametrize("backend", [Backend.JAIL, Backend.GVISOR], ids=lambda b: b.value)
async def test_delete_returns_once_the_code_stopped_and_the_rest_follows(
    backend: Backend, doctor_report: DoctorReport
) -> None:
    verdict = doctor_report.backend(backend.value)
    if not verdict.available:
        pytest.skip(f"{backend.value} cannot run here: {verdict.reason}")
    with short_dir() as base:
        settings = Settings(
            cache_dir=default_cache_dir(), state_dir=base / "state", runtime_dir=base / "run"
        )
        store = Store(base / "state.db")
        provider = HostRuntimes(settings, only=[backend])
        async with SandboxManager(store, provider).running() as manager:
            record, _ = await manager.create(CreateSandboxRequest(backend=backend), caller=SYSTEM)
            live = manager.live(record.id)
            # A process the host can find: in the jail by its own command line, under
            # gVisor by the Sentry's (every process of the sandbox runs inside it).
            marker = f"1000.{uuid.uuid4().int % 10**6}"
            execution = await live.sandbox.exec(
                ExecRequest(argv=["sleep", marker], background=True)
            )
            live.executions[execution.pid] = execution
            # (gVisor's gofer serves files to the Sentry and runs no code of the sandbox.)
            needle = marker if backend is Backend.JAIL else record.id
            with anyio.fail_after(10):
                while not (pids := code_runners(needle)):  # noqa: ASYNC110 - /proc has no event
                    await anyio.sleep(0.02)

            await manager.delete(record.id)

            assert not [pid for pid in pids if can_run_code(pid)]
            closed = manager.record(record.id)
            assert closed.state is SandboxState.STOPPED and closed.ending is Ending.KILLED
            assert manager.live_count() == 0
            with anyio.fail_after(30):
                await manager.teardowns_done()
            assert manager.teardowns_in_flight == 0 and manager.teardown_failures == 0
            assert processes_mentioning(needle) == []
            assert processes_mentioning(str(base)) == []
        store.close()
        assert await provider.reap_all() == set()  # nothing left for a restart to reap
