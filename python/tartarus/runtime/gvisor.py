"""The gVisor backend: `runsc` (ptrace platform) runs the agent as the container's
PID 1 on the template rootfs, read-only with an in-memory overlay (`--overlay2
root:memory`) that disappears with the sandbox. The agent listens on a unix socket in a
host directory bound at `/.tartarus/run`; `--host-uds=create` lets gVisor create that
socket on the host so we can connect to it. No network unless the spec asks for one
(then gVisor's netstack is swapped for the host's, `--network=host`). Memory, CPU and
pids limits go into the OCI spec, which runsc enforces with a host cgroup.

Snapshots are `runsc checkpoint` (the sandbox keeps running) and `runsc restore`.

Per runtime, one private `runsc --root` under `<state>/gvisor/runsc`; per sandbox,
`<state>/gvisor/<id>/` holds the bundle, the socket directory and runsc's logs.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Final

import anyio

from tartarus.binaries import find_binary
from tartarus.host.tools import runsc_global_flags
from tartarus.runtime import oci_spec as oci
from tartarus.runtime.agent_client import AgentClient
from tartarus.runtime.agent_sandbox import AgentSandbox
from tartarus.runtime.base import Execution, SandboxError
from tartarus.runtime.cgroups import CgroupReader, OomAwareExecution, cgroup_dirs_of
from tartarus.runtime.jail import AGENT_IN_SANDBOX, AGENT_SOCKET, SOCKET_DIR_IN_SANDBOX, agent_argv
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
)

RUNSC_TIMEOUT_S: Final = 60.0
CHECKPOINT_IMAGE: Final = "checkpoint.img"


class GvisorError(SandboxError):
    pass


def _container_name(sandbox_id: str) -> str:
    # runsc ids allow [A-Za-z0-9_.-]; the suffix keeps a re-created id from colliding.
    return f"tt-{sandbox_id}-{secrets.token_hex(3)}"


def _sandbox_id(container: str) -> str:
    return container.removeprefix("tt-").rsplit("-", 1)[0]


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class GvisorSandbox(AgentSandbox):
    def __init__(self, runtime: GvisorRuntime, spec: SandboxSpec, directory: Path) -> None:
        super().__init__()
        self.spec = spec
        self._runtime = runtime
        self._dir = directory
        self.container = _container_name(spec.id)
        self._state = SandboxState.CREATED
        self._cgroup = CgroupReader([])

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def backend(self) -> Backend:
        return Backend.GVISOR

    @property
    def bundle(self) -> Path:
        return self._dir / "bundle"

    async def _runsc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return await self._runtime.runsc(*args, network=self.spec.network, check=check)

    async def start(self, *, restore_from: Path | None = None) -> None:
        if self._state is SandboxState.RUNNING:
            return
        try:
            if restore_from is None:
                await self._runsc("run", "--detach", "--bundle", str(self.bundle), self.container)
            else:
                await self._runsc(
                    "restore",
                    "--detach",
                    "--image-path",
                    str(restore_from),
                    "--bundle",
                    str(self.bundle),
                    self.container,
                )
            await self._find_cgroup()
            self.agent = await AgentClient.connect_unix(self._dir / "run" / AGENT_SOCKET)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise
        self._state = SandboxState.RUNNING

    async def _find_cgroup(self) -> None:
        result = await self._runsc("state", self.container)
        pid = json.loads(result.stdout).get("pid", 0)
        if pid:
            self._cgroup = CgroupReader(cgroup_dirs_of(pid))

    async def status(self) -> SandboxStatus:
        result = await self._runsc("state", self.container, check=False)
        detail = "" if result.returncode == 0 else result.stderr.decode(errors="replace")[-200:]
        state = self._state
        if state is SandboxState.RUNNING and b'"status": "running"' not in result.stdout:
            state = SandboxState.STOPPED
        return SandboxStatus(id=self.id, backend=Backend.GVISOR, state=state, detail=detail)

    async def exec(self, request: ExecRequest) -> Execution:  # type: ignore[override]
        return OomAwareExecution(await super().exec(request), self._cgroup.oom_kills)

    async def stats(self) -> SandboxStats:
        if not self._cgroup.dirs:
            return await super().stats()
        return self._cgroup.stats()

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        """`runsc checkpoint --leave-running`: the sandbox goes on after the image is
        written. The agent connection is closed first (a connected host socket cannot be
        saved) and reopened after."""
        await anyio.Path(dest_dir).mkdir(parents=True, exist_ok=True)
        await self.close_agent()
        try:
            await self._runsc(
                "checkpoint", "--leave-running", "--image-path", str(dest_dir), self.container
            )
        finally:
            self.agent = await AgentClient.connect_unix(self._dir / "run" / AGENT_SOCKET)
        size = await anyio.to_thread.run_sync(_dir_size, dest_dir)
        return SnapshotInfo(
            backend=Backend.GVISOR, path=dest_dir, size_bytes=size, source_sandbox=self.id
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        if self._state is SandboxState.RUNNING:
            with contextlib.suppress(SandboxError):
                await self.shutdown_agent(grace_s)
        await self.kill()

    async def kill(self) -> None:
        await self.close_agent()
        await self._runtime.destroy(self.container)
        self._state = SandboxState.STOPPED
        await anyio.to_thread.run_sync(shutil.rmtree, self._dir, True)


class GvisorRuntime:
    def __init__(self, state_dir: Path) -> None:
        self._root = state_dir / "gvisor"
        self.runsc_root = self._root / ".runsc"

    @property
    def backend(self) -> Backend:
        return Backend.GVISOR

    async def runsc(
        self, *args: str, network: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        runsc = shutil.which("runsc")
        if runsc is None:
            raise GvisorError("runsc is not on PATH (apt-get install runsc)")
        self.runsc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = runsc_global_flags(self.runsc_root)
        flags = [f for f in flags if not f.startswith("--network")]
        flags += [f"--network={'host' if network else 'none'}", "--host-uds=create"]
        flags += ["--overlay2=root:memory"]
        with anyio.fail_after(RUNSC_TIMEOUT_S):
            result = await anyio.run_process([runsc, *flags, *args], check=False)
        if check and result.returncode != 0:
            raise GvisorError(
                f"runsc {args[0]} failed (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()[-800:]}"
            )
        return result

    def _spec(self, spec: SandboxSpec, directory: Path) -> oci.Spec:
        assert spec.rootfs is not None
        r = spec.resources
        env = [f"{k}={v}" for k, v in spec.env.items()]
        if not any(e.startswith("PATH=") for e in env):
            env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return oci.Spec(
            process=oci.Process(args=agent_argv(), env=env),
            root=oci.Root(path=str(spec.rootfs), readonly=True),
            mounts=[
                oci.Mount(destination="/proc", type="proc", source="proc"),
                oci.Mount(
                    destination="/tmp", type="tmpfs", source="tmpfs", options=["nosuid", "nodev"]
                ),
                oci.Mount(
                    destination=AGENT_IN_SANDBOX,
                    type="bind",
                    source=str(find_binary("tartarus-agent")),
                    options=["rbind", "ro"],
                ),
                oci.Mount(
                    destination=SOCKET_DIR_IN_SANDBOX,
                    type="bind",
                    source=str(directory / "run"),
                    options=["rbind", "rw"],
                ),
            ],
            linux=oci.Linux(
                resources=oci.Resources(
                    memory=oci.MemoryLimits(limit=r.memory_mib << 20),
                    cpu=oci.CpuLimits(quota=max(1000, int(r.vcpus * 100_000)), period=100_000),
                    pids=oci.PidsLimits(limit=r.pids),
                ),
            ),
        )

    async def _prepare(self, spec: SandboxSpec) -> GvisorSandbox:
        if spec.rootfs is None or not spec.rootfs.is_dir():
            raise GvisorError(
                f"gvisor needs a template root filesystem directory, got {spec.rootfs}"
            )
        directory = self._root / spec.id
        try:
            directory.mkdir(parents=True)
        except FileExistsError:
            raise GvisorError(f"a gvisor sandbox named {spec.id!r} already exists") from None
        (directory / "run").mkdir(mode=0o700)
        (directory / "bundle").mkdir()
        oci.write_bundle_config(directory / "bundle", self._spec(spec, directory))
        return GvisorSandbox(self, spec, directory)

    async def create(self, spec: SandboxSpec) -> GvisorSandbox:
        return await self._prepare(spec)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> GvisorSandbox:
        if snapshot.backend is not Backend.GVISOR:
            raise GvisorError(f"a {snapshot.backend.value} snapshot cannot restore on gvisor")
        if not (snapshot.path / CHECKPOINT_IMAGE).is_file():
            raise GvisorError(f"{snapshot.path} holds no gVisor checkpoint image")
        sandbox = await self._prepare(spec)
        await sandbox.start(restore_from=snapshot.path)
        return sandbox

    async def destroy(self, container: str) -> None:
        """Kills and deletes a container; a missing one is not an error."""
        await self.runsc("kill", container, "KILL", check=False)
        await self.runsc("delete", "--force", container, check=False)

    async def containers(self) -> list[str]:
        if not self.runsc_root.is_dir():
            return []
        result = await self.runsc("list", "-quiet", check=False)
        return [line for line in result.stdout.decode().split() if line]

    async def reap(self, keep: set[str]) -> list[str]:
        """Deletes containers and sandbox directories of this runtime not in `keep`."""
        removed: set[str] = set()
        for container in await self.containers():
            sandbox_id = _sandbox_id(container)
            if sandbox_id not in keep:
                await self.destroy(container)
                removed.add(sandbox_id)
        if self._root.is_dir():
            for entry in self._root.iterdir():
                if entry.name != self.runsc_root.name and entry.name not in keep:
                    await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
                    removed.add(entry.name)
        return sorted(removed)
