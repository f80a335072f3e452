"""The gVisor backend: `runsc` (systrap platform where it works, else ptrace) runs the
agent as the container's PID 1 on the template rootfs, read-only with an in-memory
overlay (`--overlay2 root:memory`) that disappears with the sandbox. Every sandbox runs in
a network namespace of its own (`tartarus.network`, named in the OCI spec): loopback
only unless the spec asks for a network; then gVisor's own netstack (`--network=sandbox`)
drives the namespace's link to the host, whose rules decide what it reaches. runsc takes
the address off the interface it adopts, so it is put back before every start.
Memory, CPU and pids limits go into the OCI spec, which runsc enforces with a host cgroup
around the whole sandbox.

The agent dials the host (`tartarus.runtime.agent_dial_in`): `runsc --host-uds=open`
lets it connect to a socket in the sandbox's agent directory, where the host listens
only while it waits for it. That directory (root's alone, bound read-only at
`/.tartarus`) also holds the agent binary, hard-linked: one mount, not two (~9 ms of
each start). This replaced a relay started with `runsc exec` per connection (~30 ms of
every create and restore). runsc cannot checkpoint a sandbox that holds a host socket
("encoding error at object transport.connectionedEndpoint"), so a snapshot hangs up
first (the agent confirms by closing its end) and the agent dials again after the
restore; it redials every millisecond for its first 5 s of trying. `--host-uds=open`
lets the sandbox connect to existing host sockets (not make any), and only those in its
own mounts: the template rootfs (copies in the blob store, where no host process
listens), the agent directory and a resolv.conf file.

The container's stdio would need no host socket at all, and runsc does checkpoint pipes,
but a copy restored while the agent was blocked reading them died now and then (SIGSEGV
in the agent's main thread after runsc restarted its `read(0)`), so stdio stays unused.

Snapshots are `runsc checkpoint` and `runsc restore`.

Which runsc: the `runsc` setting, else the pinned build `tartarus runsc install` caches,
else runsc on PATH (tartarus.host.runsc).

Per runtime, one private `runsc --root` under `<state>/gvisor/runsc`; per sandbox,
`<state>/gvisor/<id>/` holds the bundle, the socket directory and runsc's logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Final

import anyio
import msgspec

from tartarus import paths
from tartarus.binaries import find_binary
from tartarus.host.procfs import process_alive
from tartarus.host.runsc import (
    Runsc,
    RunscError,
    global_flags,
    probe_platform,
    resolve_runsc,
    unmount_null_netns,
)
from tartarus.network.egress import compile_rules
from tartarus.network.namespaces import SandboxNetwork, SandboxNetworks
from tartarus.network.settings import NetworkSettings
from tartarus.runtime import oci_spec as oci
from tartarus.runtime.agent_dial_in import AgentDialIn
from tartarus.runtime.base import SandboxError
from tartarus.runtime.cgroups import CgroupReader, cgroup_dirs_of
from tartarus.runtime.layout import (
    AGENT_IN_SANDBOX,
    AGENT_SOCKET,
    REATTACH_TIMEOUT_S,
    RESOLV_CONF,
    HostedAgentSandbox,
    abandon_create,
    agent_argv,
    new_sandbox_dir,
    resolv_conf_mount,
    with_rootfs,
)
from tartarus.runtime.types import (
    SANDBOX_HOSTNAME,
    Backend,
    SandboxSpec,
    SandboxState,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
)

RUNSC_TIMEOUT_S: Final = 60.0
# What the sandbox sees at /.tartarus: `<sandbox dir>/agent`.
AGENT_DIR_IN_SANDBOX: Final = str(Path(AGENT_IN_SANDBOX).parent)
AGENT_DIR: Final = "agent"
# Copies of the agent binary for hard links, when the installed one is on another
# filesystem than the state directory.
AGENT_COPIES: Final = ".agent"
CHECKPOINT_IMAGE: Final = "checkpoint.img"
# Host threads and processes of gVisor itself (sentry, gofer, ptrace stubs), on top of
# the sandbox's own pids limit, for the host cgroup's pids.max.
SENTRY_THREADS: Final = 512


class GvisorError(SandboxError):
    pass


def _container_name(sandbox_id: str) -> str:
    # runsc ids allow [A-Za-z0-9_.-]; the suffix keeps a re-created id from colliding.
    return f"tt-{sandbox_id}-{secrets.token_hex(3)}"


def _sandbox_id(container: str) -> str:
    return container.removeprefix("tt-").rsplit("-", 1)[0]


# The jail's default set (rust/jail/src/config.rs): what the agent needs to run commands
# as other users and own files. Without SYS_RESOURCE and SYS_ADMIN, RLIMIT_NPROC binds
# root inside the sandbox too.
_CAPS: Final = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
)


def _capabilities() -> oci.Capabilities:
    caps = list(_CAPS)
    return oci.Capabilities(bounding=caps, effective=caps, permitted=caps)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class GvisorSandbox(HostedAgentSandbox):
    BACKEND = Backend.GVISOR

    def __init__(
        self, runtime: GvisorRuntime, spec: SandboxSpec, directory: Path, network: SandboxNetwork
    ) -> None:
        super().__init__(spec, directory)
        self._runtime = runtime
        self.container = _container_name(spec.id)
        self.network: SandboxNetwork | None = network
        self._dial_in = AgentDialIn(self._dir / AGENT_DIR / AGENT_SOCKET)
        # The sandbox's host process (runsc's sandbox, the sentry), once started.
        self._pid: int | None = None

    @property
    def bundle(self) -> Path:
        return self._dir / "bundle"

    async def _runsc(
        self, *args: str, check: bool = True, detached: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        log = self._dir / "runsc.log" if detached else None
        return await self._runtime.runsc(*args, network=self.spec.network, check=check, log=log)

    async def start(self, *, restore_from: Path | None = None) -> None:
        if self._state is SandboxState.RUNNING:
            return
        try:
            await self._launch(restore_from)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise
        self._state = SandboxState.RUNNING

    async def _launch(self, restore_from: Path | None) -> None:
        """Runs the container (fresh, or restored from a checkpoint) and connects."""
        if restore_from is None:
            command = ["run"]
        else:
            command = ["restore", "--image-path", str(restore_from)]
        # runsc writes the sandbox's host pid here: its cgroup is found without
        # another runsc (a `runsc state` costs ~20 ms).
        pid_file = self._dir / "sandbox.pid"
        pid_file.unlink(missing_ok=True)
        if self.network is not None:
            await self._runtime.networks.address(self.network)
        self._runtime.live.add(self.container)
        await self._dial_in.listen()
        await self._runsc(
            *command,
            "--detach",
            "--pid-file",
            str(pid_file),
            "--bundle",
            str(self.bundle),
            self.container,
            detached=True,
        )
        self._find_cgroup(pid_file)
        self.agent = await self._dial_in.accept()

    async def reconnect(self) -> None:
        """Connects to the agent of a sandbox already running (left by a server that
        died): it dials this sandbox's socket again once the host listens there."""
        self._find_cgroup(self._dir / "sandbox.pid")
        self.agent = await self._dial_in.accept(timeout_s=REATTACH_TIMEOUT_S)
        self._state = SandboxState.RUNNING

    def _find_cgroup(self, pid_file: Path) -> None:
        pid = pid_file.read_text().strip() if pid_file.is_file() else ""
        if pid.isdigit() and int(pid) > 0:
            self._pid = int(pid)
            self._cgroup = CgroupReader(cgroup_dirs_of(self._pid))

    @property
    def lost(self) -> bool:
        # The agent is held only while the sandbox runs (a snapshot lets go of it
        # first); the client reads only when asked, so a dead sandbox shows in its
        # host process before it does there.
        if self._agent is None:
            return False
        return self._agent.closed or (self._pid is not None and not process_alive(self._pid))

    async def status(self) -> SandboxStatus:
        state = self._state
        detail = ""
        oom = False
        if state is SandboxState.RUNNING:
            running = await self._runtime.running(self.container)
            # Current runsc can still say "running" a moment after the host OOM killer
            # took the sandbox down; its process and the agent's connection are gone.
            if not running or self.lost:
                state = SandboxState.FAILED
                oom = self._cgroup.oom_kills() > 0
                detail = "killed by the host OOM killer" if oom else "the sandbox stopped"
        return SandboxStatus(
            id=self.id, backend=Backend.GVISOR, state=state, detail=detail, oom=oom
        )

    async def stats(self) -> SandboxStats:
        """Memory and CPU from the host cgroup (what the sandbox really costs, gVisor
        included); the process count from the agent (the host cgroup also counts the
        sentry's own threads)."""
        inside = await super().stats()
        if not self._cgroup.dirs:
            return inside
        host = self._cgroup.stats()
        return msgspec.structs.replace(host, pids=inside.pids)

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        """`runsc checkpoint`, then the sandbox resumes from the image it just wrote
        (runsc 2022's `--leave-running` hangs): processes pause for the checkpoint and
        carry on. The agent hangs up first (runsc cannot save a host socket) and dials
        again after."""
        await self._checkpoint(dest_dir, leave_running=False)
        await self._runtime.destroy(self.container)
        self.container = _container_name(self.id)
        try:
            await self._launch(dest_dir)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise
        return await self._info(dest_dir)

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        """`runsc checkpoint`, and the sandbox ends there: nothing of it is left running.
        The pinned runsc checkpoints with `--leave-running` and the sandbox is killed
        after: a checkpoint that fails (a full disk) leaves it running as it was, where a
        plain one stops it. Debian's runsc hangs with that flag (the doctor calls it
        degraded): with it, a failed pause loses the sandbox."""
        await self._checkpoint(dest_dir, leave_running=not self._runtime.resolve().degraded)
        await self.kill()
        return await self._info(dest_dir)

    async def _checkpoint(self, dest_dir: Path, *, leave_running: bool) -> None:
        await anyio.Path(dest_dir).mkdir(parents=True, exist_ok=True)
        client, self.agent = self._agent, None
        if client is not None:
            await client.hang_up()
        flags = ["--leave-running"] if leave_running else []
        try:
            await self._runsc("checkpoint", *flags, "--image-path", str(dest_dir), self.container)
        except GvisorError:
            if leave_running:
                # The sandbox still runs (a full disk, say): the agent dials again, and
                # it carries on as it was.
                with anyio.CancelScope(shield=True), contextlib.suppress(SandboxError):
                    self.agent = await self._dial_in.accept()
            raise

    async def _info(self, dest_dir: Path) -> SnapshotInfo:
        size = await anyio.to_thread.run_sync(_dir_size, dest_dir)
        return SnapshotInfo(
            backend=Backend.GVISOR, path=dest_dir, size_bytes=size, source_sandbox=self.id
        )

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        outcome = None
        if self._state is SandboxState.RUNNING:
            with contextlib.suppress(SandboxError):
                outcome = await self.shutdown_agent(grace_s)
        await self.kill()
        return outcome

    async def detach(self) -> bool:
        """runsc runs it detached, and its agent dials again once a host listens."""
        if self._state is not SandboxState.RUNNING:
            return False
        await self.close_agent()
        await self._dial_in.close()
        self._runtime.live.discard(self.container)
        return True

    async def halt(self) -> None:
        """SIGKILL to the sandbox process (the Sentry, which runs every process of the
        sandbox) ends them at once; `runsc delete` then has only its state to clear."""
        await self.close_agent()
        await self._dial_in.close()
        if self._pid is not None:
            # The Sentry and its stubs (which run the sandbox's code on the CPU under
            # systrap) are in the sandbox's own cgroup: all get SIGKILL now.
            await self._kill_processes(self.container, self._pid)

    async def kill(self) -> None:
        await self.halt()
        await self._runtime.destroy(self.container)
        network, self.network = self.network, None
        if network is not None:
            await self._runtime.networks.remove(network)
        self._state = SandboxState.STOPPED
        await anyio.to_thread.run_sync(shutil.rmtree, self._dir, True)


class GvisorRuntime:
    def __init__(
        self,
        state_dir: Path,
        *,
        runsc: Path | None = None,
        cache_dir: Path | None = None,
        network: NetworkSettings | None = None,
    ) -> None:
        self._root = state_dir / "gvisor"
        scope = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self.networks = SandboxNetworks(f"g{scope}", network)
        self.runsc_root = self._root / ".runsc"
        self._explicit = runsc
        self._cache_dir = cache_dir or paths.default_cache_dir()
        self._runsc: Runsc | None = None
        self._platform = ""
        # Containers this runtime started and has not destroyed.
        self.live: set[str] = set()

    def resolve(self) -> Runsc:
        """Finds runsc and probes its platform, once (blocking: a few hundred ms)."""
        if self._runsc is None:
            try:
                found = resolve_runsc(self._explicit, self._cache_dir)
            except RunscError as e:
                raise GvisorError(str(e)) from e
            self._platform = probe_platform(found.path).name
            self._runsc = found
        return self._runsc

    @property
    def platform(self) -> str:
        self.resolve()
        return self._platform

    @property
    def backend(self) -> Backend:
        return Backend.GVISOR

    def runsc_argv(self, *args: str, network: bool = False) -> list[str]:
        runsc = self.resolve().path
        self.runsc_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = [
            f
            for f in global_flags(self.runsc_root, self._platform)
            if not f.startswith("--network")
        ]
        flags += [
            f"--network={'sandbox' if network else 'none'}",
            "--overlay2=root:memory",
            "--host-uds=open",
        ]
        return [runsc, *flags, *args]

    async def runsc(
        self, *args: str, network: bool = False, check: bool = True, log: Path | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Runs runsc with this runtime's flags. Commands that leave a sandbox running
        (`run --detach`, `restore --detach`) must pass `log`: the sandbox inherits
        runsc's stdout and stderr, so pipes would never reach end of file."""
        if self._runsc is None:
            await anyio.to_thread.run_sync(self.resolve)
        command = self.runsc_argv(*args, network=network)
        with anyio.fail_after(RUNSC_TIMEOUT_S):
            if log is None:
                result = await anyio.run_process(command, check=False)
            else:
                with log.open("ab") as sink:
                    result = await anyio.run_process(
                        command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, check=False
                    )
        if check and result.returncode != 0:
            detail = result.stderr or (await anyio.Path(log).read_bytes() if log else b"")
            raise GvisorError(
                f"runsc {args[0]} failed (exit {result.returncode}): "
                f"{detail.decode(errors='replace').strip()[-800:]}"
            )
        return result

    def _spec(
        self, spec: SandboxSpec, network: SandboxNetwork, resolv_conf: Path | None, agent: Path
    ) -> oci.Spec:
        assert spec.rootfs is not None
        r = spec.resources
        env = [f"{k}={v}" for k, v in spec.env.items()]
        if not any(e.startswith("PATH=") for e in env):
            env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        return oci.Spec(
            process=oci.Process(
                args=agent_argv(f"dial:{AGENT_DIR_IN_SANDBOX}/{AGENT_SOCKET}"),
                cwd="/",
                env=env,
                # The sentry enforces this inside; the host cgroup below only caps the sandbox
                # as a whole (its own threads included).
                rlimits=[oci.Rlimit(type="RLIMIT_NPROC", soft=r.pids, hard=r.pids)],
                capabilities=_capabilities(),
            ),
            root=oci.Root(path=str(spec.rootfs), readonly=True),
            hostname=SANDBOX_HOSTNAME,
            mounts=[
                oci.Mount(destination="/proc", type="proc", source="proc"),
                oci.Mount(
                    destination="/tmp", type="tmpfs", source="tmpfs", options=["nosuid", "nodev"]
                ),
                # runsc's own /dev/shm is 0755: POSIX semaphores (multiprocessing) fail
                # for any user but root. As the jail mounts it (rust/jail/src/mounts.rs).
                oci.Mount(
                    destination="/dev/shm",
                    type="tmpfs",
                    source="shm",
                    options=["nosuid", "nodev", "mode=1777", "size=64m"],
                ),
                oci.Mount(
                    destination=AGENT_DIR_IN_SANDBOX,
                    type="bind",
                    source=str(agent),
                    options=["rbind", "ro"],
                ),
                *(
                    [
                        oci.Mount(
                            destination=RESOLV_CONF,
                            type="bind",
                            source=str(resolv_conf),
                            options=["rbind", "ro"],
                        )
                    ]
                    if resolv_conf is not None
                    else []
                ),
            ],
            linux=oci.Linux(
                namespaces=[
                    *(oci.Namespace(type=t) for t in ("pid", "ipc", "uts", "mount")),
                    oci.Namespace(type="network", path=str(network.path)),
                ],
                resources=oci.Resources(
                    memory=oci.MemoryLimits(limit=r.memory_mib << 20),
                    cpu=oci.CpuLimits(quota=max(1000, int(r.vcpus * 100_000)), period=100_000),
                    pids=oci.PidsLimits(limit=r.pids + SENTRY_THREADS),
                ),
            ),
        )

    async def _prepare(self, spec: SandboxSpec) -> GvisorSandbox:
        spec = await with_rootfs(spec)
        directory = new_sandbox_dir(self._root, spec, Backend.GVISOR.value)
        network: SandboxNetwork | None = None
        try:
            rules = None
            if spec.network:
                rules = await anyio.to_thread.run_sync(compile_rules, spec.egress)
            network = await self.networks.create(spec.id, rules)
            (directory / "bundle").mkdir()
            # Root's alone: only the agent (root in the sandbox) dials through it.
            agent = directory / AGENT_DIR
            agent.mkdir(mode=0o700)
            self._link_agent(agent / Path(AGENT_IN_SANDBOX).name)
            resolv = resolv_conf_mount(spec, directory, network.resolv_conf())
            oci.write_bundle_config(directory / "bundle", self._spec(spec, network, resolv, agent))
        except BaseException:
            await abandon_create(directory, self.networks, network)
            raise
        return GvisorSandbox(self, spec, directory, network)

    def _link_agent(self, dest: Path) -> None:
        """Hard-links the agent binary to `dest`; from another filesystem, through a copy
        kept here (one per installed binary)."""
        source = find_binary("tartarus-agent")
        with contextlib.suppress(OSError):
            os.link(source, dest)
            return
        facts = source.stat()
        copies = self._root / AGENT_COPIES
        copy = copies / f"tartarus-agent-{facts.st_size}-{facts.st_mtime_ns}"
        if not copy.exists():
            copies.mkdir(mode=0o700, exist_ok=True)
            for old in copies.iterdir():
                old.unlink(missing_ok=True)
            partial = copies / f".partial-{secrets.token_hex(4)}"
            shutil.copy2(source, partial)
            partial.replace(copy)
        os.link(copy, dest)

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

    async def reattach(self, spec: SandboxSpec) -> GvisorSandbox | None:
        """A sandbox outlives its server: runsc runs it detached, and its agent dials
        the socket again until a host listens (every 100 ms once the host is gone for
        long). This finds its container still running, takes over its namespace, and
        listens for the agent; None if any of that is gone."""
        directory = self._root / spec.id
        running = [
            c
            for c in await self.containers()
            if _sandbox_id(c) == spec.id and await self.running(c)
        ]
        if not running or not (directory / "bundle").is_dir():
            return None
        network = await self.networks.reattach(spec)
        if network is None:
            return None
        sandbox = GvisorSandbox(self, spec, directory, network)
        sandbox.container = running[0]
        self.live.add(sandbox.container)
        try:
            await sandbox.reconnect()
        except SandboxError:
            return None
        return sandbox

    async def running(self, container: str) -> bool:
        """Whether runsc says `container` is running."""
        result = await self.runsc("state", container, check=False)
        with contextlib.suppress(ValueError):
            return result.returncode == 0 and json.loads(result.stdout).get("status") == "running"
        return False

    async def destroy(self, container: str) -> None:
        """Kills and deletes a container; a missing one is not an error. `delete
        --force` kills a running one itself (one runsc where there were two, ~11 ms)."""
        await self.runsc("delete", "--force", container, check=False)
        self.live.discard(container)
        if not self.live:
            # Current runsc pins an empty netns for --network=none sandboxes at
            # <root>/null-netns and never lets it go; the next sandbox pins a new one.
            unmount_null_netns(self.runsc_root)

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
                if entry.name not in (self.runsc_root.name, AGENT_COPIES, *keep):
                    await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
                    removed.add(entry.name)
        if not self.live:
            unmount_null_netns(self.runsc_root)
        removed.update(await self.networks.reap(keep))
        return sorted(removed)
