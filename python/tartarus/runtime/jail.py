"""The jail backend: `tartarus-jail` (Rust) runs the agent in fresh namespaces on an
overlay of the template rootfs, under cgroup limits, reduced capabilities and Typhon's
seccomp profile; the host talks to the agent over a unix socket in a directory bound
into the jail at `/.tartarus/run`.

Per sandbox, under `<state>/jail/<id>/`: `config.json` (what `tartarus-jail` runs),
`supervisor.pid` and `started.json` (its `started` event: init's pid and the cgroup
directories), both kept for `reap`, `work/` (an empty mount point; the scratch tmpfs
lives only inside the jail), `run/agent.sock` and `agent.log`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Final, Literal

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from tartarus import codec
from tartarus.binaries import find_binary
from tartarus.host.procfs import exited
from tartarus.network.egress import compile_rules
from tartarus.network.namespaces import SandboxNetwork, SandboxNetworks
from tartarus.network.settings import NetworkSettings
from tartarus.runtime.agent_client import AgentClient
from tartarus.runtime.base import NotSupportedError, SandboxError
from tartarus.runtime.cgroups import CgroupDir, CgroupReader, cgroup_dirs_named, cgroup_mounts
from tartarus.runtime.layout import (
    AGENT_IN_SANDBOX,
    AGENT_SOCKET,
    REATTACH_TIMEOUT_S,
    RESOLV_CONF,
    SOCKET_DIR_IN_SANDBOX,
    HostedAgentSandbox,
    abandon_create,
    agent_argv,
    new_sandbox_dir,
    own_socket,
    reachable_socket,
    resolv_conf_mount,
    wait_for_path,
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

START_TIMEOUT_S: Final = 30.0
# How long `reap` waits for a killed supervisor to go.
REAP_WAIT_S: Final = 5.0
SUPERVISOR_PID: Final = "supervisor.pid"
_EVENT_LINE_MAX: Final = 64 << 10


class JailError(SandboxError):
    pass


class BindMount(msgspec.Struct, frozen=True):
    source: Path
    destination: str
    readonly: bool = True


class CgroupConfig(msgspec.Struct, frozen=True):
    parent: str
    name: str
    memory_bytes: int | None = None
    pids: int | None = None
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000


class JailConfig(msgspec.Struct, frozen=True):
    """Mirror of `tartarus-jail`'s config (rust/jail/src/config.rs), less the options
    Python leaves at their defaults (user_namespace, rlimits, capabilities, seccomp, cwd,
    uid, gid); checked against tests/vectors/config/jail_*.json."""

    id: str
    rootfs: Path
    work_dir: Path
    argv: list[str]
    hostname: str = SANDBOX_HOSTNAME
    scratch_mib: int = 1024
    # A prepared namespace to join (`tartarus.network`); None: loopback only.
    network_namespace: Path | None = None
    mounts: list[BindMount] = msgspec.field(default_factory=list)
    cgroup: CgroupConfig | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    # "inherit", "null" or {"file": host path}.
    stdio: Literal["inherit", "null"] | dict[str, Path] = "inherit"
    # Keep running when the host that started it dies (it re-attaches on restart).
    outlive_host: bool = False


class CgroupDirs(msgspec.Struct, frozen=True):
    dirs: list[CgroupDir]


class StartedEvent(msgspec.Struct, frozen=True, tag="started", tag_field="event"):
    pid: int
    # The supervisor's pid: with `outlive_host` a fork of the process we started.
    supervisor: int | None = None
    cgroup: CgroupDirs | None = None
    user_namespace: bool = False

    def cgroup_dirs(self) -> list[CgroupDir]:
        return self.cgroup.dirs if self.cgroup else []


class ExitedEvent(msgspec.Struct, frozen=True, tag="exited", tag_field="event"):
    code: int
    oom_kills: int = 0


JailEvent = StartedEvent | ExitedEvent
_decode_event: msgspec.json.Decoder[JailEvent] = msgspec.json.Decoder(
    JailEvent, dec_hook=codec.dec_hook
)


class JailSandbox(HostedAgentSandbox):
    BACKEND = Backend.JAIL

    def __init__(
        self,
        spec: SandboxSpec,
        directory: Path,
        networks: SandboxNetworks,
        network: SandboxNetwork | None = None,
    ) -> None:
        super().__init__(spec, directory)
        self._networks = networks
        # The prepared namespace of a sandbox granted a network (others get a fresh
        # loopback-only one from tartarus-jail, which dies with the jail).
        self.network = network
        self._process: anyio.abc.Process | None = None
        self._events: BufferedByteReceiveStream | None = None
        self._started: StartedEvent | None = None
        # The supervisor's pid: our child, or (re-attached after a restart) not.
        self._supervisor: int | None = None

    @property
    def init_pid(self) -> int | None:
        """Host pid of the jail's init (for tests and `reap`)."""
        return self._started.pid if self._started else None

    async def start(self) -> None:
        if self._state is SandboxState.RUNNING:
            return
        jail = find_binary("tartarus-jail")
        self._process = await anyio.open_process(
            [str(jail), "run", "--config", str(self._dir / "config.json"), "--events-fd", "1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Written before the jail reports anything: if this process dies before it reads
        # the `started` event, `reap` still finds the jail by its supervisor.
        (self._dir / SUPERVISOR_PID).write_text(f"{self._process.pid}\n")
        assert self._process.stdout is not None
        self._events = BufferedByteReceiveStream(self._process.stdout)
        try:
            with anyio.fail_after(START_TIMEOUT_S):
                event = await self._next_event()
            if not isinstance(event, StartedEvent):
                await self._failed_to_start()
            assert isinstance(event, StartedEvent)
            self._started = event
            self._supervisor = event.supervisor or self._process.pid
            (self._dir / SUPERVISOR_PID).write_text(f"{self._supervisor}\n")
            (self._dir / "started.json").write_bytes(codec.to_json(event))
            self._cgroup = CgroupReader(event.cgroup_dirs())
            socket_path = self._dir / "run" / AGENT_SOCKET
            await wait_for_path(socket_path, START_TIMEOUT_S)
            with reachable_socket(socket_path) as reachable:
                self.agent = await AgentClient.connect_unix(reachable)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.kill()
            raise
        self._state = SandboxState.RUNNING

    async def _next_event(self) -> JailEvent | None:
        assert self._events is not None
        try:
            line = await self._events.receive_until(b"\n", _EVENT_LINE_MAX)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return None
        event: JailEvent = _decode_event.decode(line)
        return event

    async def _failed_to_start(self) -> None:
        raise JailError(f"jail {self.id} ended before starting: {await self._stderr()}")

    async def _stderr(self) -> str:
        if self._process is None or self._process.stderr is None:
            return ""
        data = bytearray()
        with anyio.move_on_after(5):
            async for chunk in self._process.stderr:
                data += chunk
                if len(data) > 16 << 10:
                    break
        return data.decode(errors="replace").strip() or f"exit status {self._process.returncode}"

    def _supervisor_alive(self) -> bool:
        process = self._process
        if process is not None and self._supervisor in (None, process.pid):
            return process.returncode is None  # our own child
        # Detached (`outlive_host`), or re-attached after a restart.
        return self._supervisor is not None and _is_jail_process(self._supervisor, self._dir)

    @property
    def lost(self) -> bool:
        # Its supervisor's exit shows before the agent's connection (read only when
        # asked) does; a connection that closed while the jail runs is not an end.
        return self._agent is not None and not self._supervisor_alive()

    async def reconnect(self, started: StartedEvent, supervisor: int) -> None:
        """Connects to a jail left running by a server that died (its agent listens on
        its socket as before)."""
        self._started, self._supervisor = started, supervisor
        self._cgroup = CgroupReader(started.cgroup_dirs())
        # A paused jail is frozen: its agent answers once thawed for the moment.
        frozen = await anyio.to_thread.run_sync(self._cgroup.frozen)
        if frozen:
            await self.thaw()
        try:
            # The socket's directory is the jail's to write: no following links.
            with own_socket(self._dir / "run" / AGENT_SOCKET) as reachable:
                with anyio.fail_after(REATTACH_TIMEOUT_S):
                    self.agent = await AgentClient.connect_unix(reachable)
        finally:
            if frozen:
                await self.freeze()
        self._state = SandboxState.RUNNING

    async def status(self) -> SandboxStatus:
        state = self._state
        detail, oom = "", False
        if state is SandboxState.RUNNING and not self._supervisor_alive():
            state = SandboxState.FAILED
            oom = self._cgroup.oom_kills() > 0
            detail = "killed by the host OOM killer" if oom else "the jail exited"
        return SandboxStatus(id=self.id, backend=Backend.JAIL, state=state, detail=detail, oom=oom)

    async def stats(self) -> SandboxStats:
        if not self._cgroup.dirs:
            return await super().stats()
        return self._cgroup.stats()

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(Backend.JAIL, "snapshots")

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        raise NotSupportedError(Backend.JAIL, "pausing to disk (it freezes instead)")

    async def freeze(self) -> None:
        """Freezes the sandbox's cgroup, the agent with it: memory stays in use."""
        await anyio.to_thread.run_sync(self._cgroup.freeze, True)

    async def thaw(self) -> None:
        await anyio.to_thread.run_sync(self._cgroup.freeze, False)

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        outcome = None
        if self._state is SandboxState.RUNNING:
            with contextlib.suppress(SandboxError):
                outcome = await self.shutdown_agent(grace_s)
            await self._supervisor_gone(grace_s + 5)
        await self.kill()
        return outcome

    async def _supervisor_gone(self, within_s: float) -> None:
        with anyio.move_on_after(within_s):
            if self._process is not None:
                await self._process.wait()
            if self._supervisor is not None and self._supervisor_alive():
                await exited(self._supervisor)

    async def detach(self) -> bool:
        """A jail whose supervisor detached from us (`outlive_host`) runs on; its agent
        keeps listening on its socket."""
        process = self._process
        ours = process is not None and self._supervisor == process.pid
        if self._state is not SandboxState.RUNNING or self._supervisor is None or ours:
            return False
        await self.close_agent()
        self._process = None
        if process is not None:
            await process.aclose()  # the launcher, which exited when the jail started
        return True

    async def halt(self) -> None:
        await self.close_agent()
        if self._supervisor_alive() and self._started is not None:
            # Every process of the cgroup gets its SIGKILL now (init's death takes the
            # PID namespace down too, but only as init exits). Killing init makes the
            # supervisor remove the cgroup and exit.
            await self._kill_processes(self.id, self._started.pid)

    async def kill(self) -> None:
        await self.halt()
        await self._supervisor_gone(10)
        process, self._process = self._process, None
        if process is not None:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.aclose()
        if self._supervisor is not None:
            _kill_jail_process(self._supervisor, self._dir)
        else:
            # Detached before it said which process it is: find it by its config.
            for pid in await anyio.to_thread.run_sync(_jail_processes, self._dir):
                _kill_jail_process(pid, self._dir)
        self._supervisor = None
        if self._cgroup.dirs:
            await anyio.to_thread.run_sync(self._cgroup.kill_and_remove)
        network, self.network = self.network, None
        if network is not None:
            await self._networks.remove(network)
        self._state = SandboxState.STOPPED
        await anyio.to_thread.run_sync(shutil.rmtree, self._dir, True)


class JailRuntime:
    """The jail backend on this host. Sandboxes live under `state_dir/jail/<id>`; their
    cgroups under `tartarus/<hash of state_dir>` in each hierarchy, so runtimes with
    different state directories (tests, several servers) never touch each other's."""

    def __init__(
        self,
        state_dir: Path,
        *,
        cgroup_parent: str | None = None,
        network: NetworkSettings | None = None,
        outlive_host: bool = True,
    ) -> None:
        self._root = state_dir / "jail"
        # Jails run on when their server dies (the next one re-attaches), or end with it.
        self.outlive_host = outlive_host
        scope = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
        self.cgroup_parent = cgroup_parent or f"tartarus/{scope}"
        self.networks = SandboxNetworks(f"j{scope[:8]}", network)

    @property
    def backend(self) -> Backend:
        return Backend.JAIL

    def _config(
        self, spec: SandboxSpec, directory: Path, network: SandboxNetwork | None
    ) -> JailConfig:
        assert spec.rootfs is not None
        r = spec.resources
        cgroup = None
        if os.geteuid() == 0:
            cgroup = CgroupConfig(
                parent=self.cgroup_parent,
                name=f"{spec.id}-{secrets.token_hex(3)}",
                memory_bytes=r.memory_mib << 20,
                pids=r.pids,
                cpu_quota_us=max(1000, int(r.vcpus * 100_000)),
            )
        return JailConfig(
            id=spec.id,
            rootfs=spec.rootfs,
            work_dir=directory / "work",
            argv=agent_argv(),
            scratch_mib=r.disk_mib,
            network_namespace=network.path if network is not None else None,
            mounts=[
                BindMount(source=find_binary("tartarus-agent"), destination=AGENT_IN_SANDBOX),
                BindMount(
                    source=directory / "run", destination=SOCKET_DIR_IN_SANDBOX, readonly=False
                ),
                *(
                    [BindMount(source=resolv, destination=RESOLV_CONF)]
                    if network is not None
                    and (resolv := resolv_conf_mount(spec, directory, network.resolv_conf()))
                    else []
                ),
            ],
            cgroup=cgroup,
            env=dict(spec.env),
            stdio={"file": directory / "agent.log"},
            outlive_host=self.outlive_host,
        )

    async def create(self, spec: SandboxSpec) -> JailSandbox:
        spec = await with_rootfs(spec)
        directory = new_sandbox_dir(self._root, spec, Backend.JAIL.value)
        (directory / "work").mkdir()
        (directory / "run").mkdir(mode=0o700)
        network: SandboxNetwork | None = None
        try:
            if spec.network:
                rules = await anyio.to_thread.run_sync(compile_rules, spec.egress)
                network = await self.networks.create(spec.id, rules)
            config = self._config(spec, directory, network)
            (directory / "config.json").write_bytes(codec.to_json(config))
        except BaseException:
            await abandon_create(directory, self.networks, network)
            raise
        return JailSandbox(spec, directory, self.networks, network)

    async def restore(self, snapshot: SnapshotInfo, spec: SandboxSpec) -> JailSandbox:
        raise NotSupportedError(Backend.JAIL, "snapshots")

    def remove_cgroup_scope(self) -> None:
        """Removes this runtime's (empty) parent cgroups; one still in use stays."""
        for mount in cgroup_mounts():
            with contextlib.suppress(OSError):
                (mount / self.cgroup_parent).rmdir()

    async def reattach(self, spec: SandboxSpec) -> JailSandbox | None:
        """A jail outlives its server (its supervisor is told to, `outlive_host`) and
        its agent keeps listening on its socket: this finds its supervisor still
        running, takes over its namespace and connects; None if any of that is gone."""
        directory = self._root / spec.id
        try:
            started = _decode_event.decode((directory / "started.json").read_bytes())
            supervisor = int((directory / SUPERVISOR_PID).read_text())
        except (OSError, ValueError, msgspec.DecodeError):
            return None
        if not isinstance(started, StartedEvent) or not _is_jail_process(supervisor, directory):
            return None
        network = None
        # Without a grant the jail made its own namespace, which went nowhere.
        if spec.network and (network := await self.networks.reattach(spec)) is None:
            return None
        sandbox = JailSandbox(spec, directory, self.networks, network)
        try:
            await sandbox.reconnect(started, supervisor)
        except (OSError, SandboxError):
            return None
        return sandbox

    async def reap(self, keep: set[str]) -> list[str]:
        """Kills jails this runtime left behind (after a crash) and removes their
        cgroups and directories (and the parent cgroups when nothing is kept)."""
        removed: list[str] = []
        if not keep:
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(self.remove_cgroup_scope)
        if not self._root.is_dir():
            await self.networks.reap(keep)
            return removed
        for entry in sorted(self._root.iterdir()):
            if entry.name in keep:
                continue
            await anyio.to_thread.run_sync(self._reap_one, entry)
            await anyio.to_thread.run_sync(shutil.rmtree, entry, True)
            removed.append(entry.name)
        # After the jails: a namespace goes once nothing runs in it.
        await self.networks.reap(keep)
        return removed

    def _reap_one(self, directory: Path) -> None:
        """Kills one jail left behind and removes its cgroups. Its init and everything
        in its cgroup are killed (found through its `started` event when its host read
        one, else through the cgroup its config names); its supervisor then reaps init,
        removes the cgroup and exits, and is killed if it does not (one stopped before
        the jail's cgroup existed: its init dies with it, PR_SET_PDEATHSIG)."""
        dirs: list[CgroupDir] = []
        with contextlib.suppress(OSError, msgspec.DecodeError):
            event = _decode_event.decode((directory / "started.json").read_bytes())
            if isinstance(event, StartedEvent):
                dirs = event.cgroup_dirs()
                _kill_jail_process(event.pid, directory)
        if not dirs:
            with contextlib.suppress(OSError, msgspec.DecodeError):
                config = msgspec.json.decode(
                    (directory / "config.json").read_bytes(),
                    type=JailConfig,
                    dec_hook=codec.dec_hook,
                )
                if config.cgroup is not None:
                    dirs = cgroup_dirs_named(f"{config.cgroup.parent}/{config.cgroup.name}")
        cgroup = CgroupReader(dirs)
        for pid in cgroup.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            supervisor = int((directory / SUPERVISOR_PID).read_text())
            deadline = time.monotonic() + REAP_WAIT_S
            while _is_jail_process(supervisor, directory) and time.monotonic() < deadline:
                time.sleep(0.01)
            _kill_jail_process(supervisor, directory)
        # Any other tartarus-jail of this directory: one whose host died while it was
        # starting, before a pid file, an event or a cgroup could name it.
        for pid in _jail_processes(directory):
            _kill_jail_process(pid, directory)
        cgroup.kill_and_remove()


def _is_jail_process(pid: int, directory: Path) -> bool:
    """True if `pid` still is a tartarus-jail (supervisor or init) of the jail in
    `directory` (and not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tartarus-jail" in cmdline and os.fsencode(directory / "config.json") in cmdline


def _jail_processes(directory: Path) -> list[int]:
    """Pids of every tartarus-jail process of the jail in `directory`."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _is_jail_process(int(entry.name), directory)
    ]


def _kill_jail_process(pid: int, directory: Path) -> bool:
    if not _is_jail_process(pid, directory):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True
