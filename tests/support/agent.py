"""The real `tartarus-agent`, run on the host as a subprocess (no isolation), and a
minimal `AgentSandbox` around it: how the agent tests drive the agent. Backends add
isolation around the very same binary."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tartarus.binaries import find_binary
from tartarus.runtime.agent_client import AgentClient
from tartarus.runtime.agent_sandbox import AgentSandbox
from tartarus.runtime.base import NotSupportedError
from tartarus.runtime.types import (
    Backend,
    SandboxState,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
)


@contextmanager
def running_agent(
    workdir: Path, *, extra: list[str] | None = None, prefix: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Starts `tartarus-agent serve --listen unix:<workdir>/agent.sock`; on exit stops
    it with SIGTERM and checks it exited cleanly and left no children behind."""
    socket = workdir / "agent.sock"
    stderr = (workdir / "agent.stderr").open("wb")
    argv = [
        *(prefix or []),
        str(find_binary("tartarus-agent")),
        "serve",
        "--listen",
        f"unix:{socket}",
        *(extra or []),
    ]
    proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        yield proc, socket
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr.close()


class HostAgentSandbox(AgentSandbox):
    """The agent on the host, for tests: lifecycle is just the connection."""

    def __init__(self, socket: Path) -> None:
        super().__init__()
        self._socket = socket

    @property
    def id(self) -> str:
        return f"host-agent-{os.getpid()}"

    @property
    def backend(self) -> Backend:
        return Backend.JAIL

    async def start(self) -> None:
        self.agent = await AgentClient.connect_unix(self._socket)

    async def status(self) -> SandboxStatus:
        state = SandboxState.RUNNING if self._agent is not None else SandboxState.STOPPED
        return SandboxStatus(id=self.id, backend=self.backend, state=state)

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(self.backend, "snapshot")

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        outcome = await self.shutdown_agent(grace_s)
        await self.close_agent()
        return outcome

    async def kill(self) -> None:
        await self.close_agent()
