"""What the agent-backed backends (jail, gvisor) share: where the agent lives inside a
sandbox, how it is started, and each sandbox's directory on the host."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Final

import anyio
import msgspec

from tartarus.runtime.agent_sandbox import AgentSandbox
from tartarus.runtime.base import Execution, NoNetworkError, SandboxError
from tartarus.runtime.cgroups import CgroupReader, OomAwareExecution
from tartarus.runtime.types import Backend, ExecRequest, SandboxSpec, SandboxState

if TYPE_CHECKING:
    from tartarus.network.namespaces import SandboxNetwork, SandboxNetworks

AGENT_IN_SANDBOX: Final = "/.tartarus/tartarus-agent"
SOCKET_DIR_IN_SANDBOX: Final = "/.tartarus/run"
AGENT_SOCKET: Final = "agent.sock"


RESOLV_CONF: Final = "/etc/resolv.conf"

# How long a restarted server waits for a surviving sandbox's agent to answer (gVisor's
# redials every 100 ms; the jail's listens).
REATTACH_TIMEOUT_S: Final = 5.0


def resolv_conf_mount(spec: SandboxSpec, directory: Path, text: str | None) -> Path | None:
    """Writes the sandbox's `/etc/resolv.conf` (naming its resolver on the host) into
    its directory, to be bound over the template's; None when there is no resolver, or
    the template's is a symlink (a bind mount cannot land on one safely)."""
    if text is None or spec.rootfs is None:
        return None
    if (spec.rootfs / RESOLV_CONF.lstrip("/")).is_symlink():
        return None
    path = directory / "resolv.conf"
    path.write_text(text)
    return path


def agent_argv(listen: str = f"unix:{SOCKET_DIR_IN_SANDBOX}/{AGENT_SOCKET}") -> list[str]:
    """How every agent-backed backend starts the agent inside the sandbox."""
    return [AGENT_IN_SANDBOX, "serve", "--listen", listen]


async def with_rootfs(spec: SandboxSpec) -> SandboxSpec:
    """The spec with its template's root filesystem (built and cached by the image
    store on first use) unless it names one already."""
    if spec.rootfs is None:
        from tartarus.images import TemplateStore  # noqa: PLC0415 - only when needed

        template = await TemplateStore().resolve(spec.template, ext4=False)
        spec = msgspec.structs.replace(spec, rootfs=template.rootfs)
    return spec


def new_sandbox_dir(root: Path, spec: SandboxSpec, backend: str) -> Path:
    """Checks the spec has a rootfs directory and creates `root/<id>` (which must not
    exist: ids are unique per runtime)."""
    if spec.rootfs is None or not spec.rootfs.is_dir():
        raise SandboxError(
            f"the {backend} backend needs a template root filesystem directory, got {spec.rootfs}"
        )
    directory = root / spec.id
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        raise SandboxError(f"a {backend} sandbox named {spec.id!r} already exists") from None
    return directory


@contextlib.contextmanager
def reachable_socket(path: Path) -> Iterator[str]:
    """A path to connect to `path` by, short enough for AF_UNIX (108 bytes) however
    deep the state directory is: through an O_PATH descriptor of its directory."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


@contextlib.contextmanager
def own_socket(path: Path) -> Iterator[str]:
    """A path to connect to the socket at `path` when the sandbox can write where it
    lies: `path` itself is opened without following a symlink and must be a socket,
    and the connect goes through that descriptor, so a symlink or a swap made by the
    sandbox cannot point the host at another socket."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        raise SandboxError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise SandboxError(f"{path} is not a socket")
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


async def wait_for_path(path: Path, timeout_s: float) -> None:
    """Polls (every 0.5 ms: the agent binds its socket within milliseconds) until `path`
    exists; the agent client then connects without its backoff. The stat runs here, not
    on a worker thread: on the sandbox's local run directory it takes microseconds, a
    thread hand-off 0.15-0.5 ms, on every create."""
    with anyio.move_on_after(timeout_s):
        while not path.exists():  # noqa: ASYNC110, ASYNC240 - see above
            await anyio.sleep(0.0005)


class HostedAgentSandbox(AgentSandbox):
    """An agent-backed sandbox with a host directory and a host cgroup: exec results
    learn about OOM kills from the cgroup (the agent inside cannot see them)."""

    BACKEND: ClassVar[Backend]
    # Its namespace (and link, with a grant), when Styx made one.
    network: SandboxNetwork | None = None

    def __init__(self, spec: SandboxSpec, directory: Path) -> None:
        super().__init__()
        self.spec = spec
        self._dir = directory
        self._state = SandboxState.CREATED
        self._cgroup = CgroupReader([])
        # Set once its processes were killed (`halt`): a pid is signalled only once.
        self._halted = False

    async def _kill_processes(self, owner: str, main_pid: int) -> None:
        """SIGKILL to every process of the sandbox's own cgroup (named for `owner`), then
        to `main_pid`, queued before this returns. Once only: a pid may be reused after."""
        if self._halted:
            return
        self._halted = True
        await anyio.to_thread.run_sync(self._cgroup.kill_all, owner)
        with contextlib.suppress(ProcessLookupError):
            os.kill(main_pid, signal.SIGKILL)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def backend(self) -> Backend:
        return self.BACKEND

    async def port_address(self, port: int) -> tuple[str, int]:
        # The link's sandbox end: routed from the host, and the egress filter lets the
        # answers back (a connection the host opened).
        lease = self.network.lease if self.network is not None else None
        if lease is None:
            raise NoNetworkError(self.id)
        return lease.sandbox_address, port

    async def exec(self, request: ExecRequest) -> Execution:  # type: ignore[override]
        return OomAwareExecution(await super().exec(request), self._cgroup.oom_kills)


async def abandon_create(
    directory: Path, networks: SandboxNetworks, network: SandboxNetwork | None
) -> None:
    """Undoes a create that failed part-way: its network, then its directory. Shielded,
    so a cancelled create still cleans up."""
    with anyio.CancelScope(shield=True):
        if network is not None:
            await networks.remove(network)
        await anyio.to_thread.run_sync(shutil.rmtree, directory, True)
