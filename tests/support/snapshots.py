"""Helpers for snapshot tests: VMM processes that always end, and a probe guest
snapshotted in the middle of a computation."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

import anyio

from tartarus.config import Settings
from tartarus.endpoint import Endpoint
from tartarus.images.store import TemplateManifest
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.base import Runtime
from tartarus.runtime.microvm import MicroVmRuntime
from tartarus.runtime.types import Backend, Resources, SandboxSpec
from tartarus.runtime.vmm_api import BootProtocol, MachineConfig, SerialFile, VmmProcess, VmState
from tartarus.sdk.client import Client
from tartarus.server.serve import ServeOptions, serve

# `gen N` prints a dot each time the rounds left reach a multiple of 16384: with 20000
# rounds the first dot comes after 3616 rounds, mid-computation.
GEN_ROUNDS = 20_000


def machine(guest: Path, serial: Path, program: str, **extra: Any) -> MachineConfig:
    return MachineConfig(
        memory_mib=extra.pop("memory_mib", 64),
        kernel=guest,
        cmdline=program,
        boot_protocol=BootProtocol.LINUX64,
        serial=SerialFile(path=serial),
        wall_clock_limit_ms=120_000,
        **extra,
    )


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 60) -> None:
    """Polls `check` until it is true; fails after `timeout_s`."""
    with anyio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await anyio.sleep(0.01)


async def moved_past(read: Callable[[], Awaitable[int]], past: int, timeout_s: float) -> int:
    """Reads a counter until it passes `past` or `timeout_s` runs out, and returns the
    last value read for the caller to assert on: under load one turn of a counting loop
    can outlast any fixed pause, but a live counter moves on within the bound."""
    value = past
    with anyio.move_on_after(timeout_s):
        while value <= past:
            await anyio.sleep(0.1)
            value = await read()
    return value


async def wait_for(
    path: Path, text: str, count: int = 1, timeout_s: float = 60, *, whole_line: bool = False
) -> str:
    """Waits until `text` appears `count` times in the file; with `whole_line`, also
    until the line of its last appearance is complete (a guest prints byte by byte)."""
    with anyio.fail_after(timeout_s):
        while True:
            apath = anyio.Path(path)
            content = await apath.read_text() if await apath.exists() else ""
            if content.count(text) >= count and (
                not whole_line or "\n" in content.rpartition(text)[2]
            ):
                return content
            await anyio.sleep(0.005)


@contextlib.asynccontextmanager
async def vmm_at(workdir: Path) -> AsyncIterator[VmmProcess]:
    vmm = await VmmProcess.launch(workdir)
    try:
        yield vmm
    finally:
        await vmm.stop()


async def snapshot_when(guest: Path, workdir: Path, snap: Path, program: str, mark: str) -> str:
    """Boots `program`, pauses it once its serial output shows `mark`, writes a
    snapshot to `snap` and ends that VMM. Returns the serial output up to the pause."""
    serial = workdir / "origin.log"
    async with vmm_at(workdir / "origin") as vmm:
        await vmm.configure(machine(guest, serial, program))
        await vmm.start()
        await wait_for(serial, mark)
        assert (await vmm.pause()).state is VmState.PAUSED
        await vmm.snapshot(snap)
    return await anyio.Path(serial).read_text()


async def snapshot_mid_gen(guest: Path, workdir: Path, snap: Path) -> str:
    """`gen` paused at its first progress dot, in the middle of its computation."""
    return await snapshot_when(guest, workdir, snap, f"gen {GEN_ROUNDS}", ".")


async def snapshot_spinning(guest: Path, workdir: Path, snap: Path) -> str:
    """`spin`: a guest that runs until it is stopped (restored sandboxes stay up)."""
    return await snapshot_when(guest, workdir, snap, "spin", "spin\n")


def our_vmms(root: Path) -> list[int]:
    """Live tartarus-vmm processes whose command line mentions `root`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"tartarus-vmm" in cmdline and str(root).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


async def end_leftover_vmms(root: Path) -> list[int]:
    """SIGTERMs VMMs a failed test left under `root` (a jailed VMM's supervisor then
    removes its jail and cgroup) and waits for them; returns the pids it found."""
    found = our_vmms(root)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for _ in range(200):  # up to 10 s
        if not our_vmms(root):
            break
        await anyio.sleep(0.05)
    return found


# The probe guests' "template": nothing to build, nothing to warm up.
PROBE_MANIFEST = TemplateManifest(
    id="probe",
    description="probe guest snapshots",
    source="test",
    key="",
    rootfs="",
    ext4=None,
    layers=[],
    base="",
    agent="",
    env={},
    workdir="/",
    user=None,
    entrypoint=[],
    cmd=[],
    resources=Resources(),
    max_resources=None,
    timeout_s=300.0,
    backends=[Backend.MICROVM],
    warmup=None,
    size_bytes=0,
    files=0,
    built_at=0.0,
    build_seconds=0.0,
)


class ProbeRuntimes(HostRuntimes):
    """This host's runtimes as the server sees them, except that every sandbox is a
    microVM (the real runtime) and templates need no build: for restoring probe-guest
    snapshots, which is all a microVM can do on a host whose KVM cannot boot Linux."""

    def __init__(self, settings: Settings, microvm: MicroVmRuntime) -> None:
        super().__init__(settings)
        self.microvm = microvm

    def runtime(self, backend: Backend) -> Runtime:
        return self.microvm

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        return self.microvm, "probe guests restore on this host's KVM"

    async def prepare(
        self, spec: SandboxSpec, backend: Backend
    ) -> tuple[SandboxSpec, TemplateManifest]:
        return spec, PROBE_MANIFEST

    async def release(self, sandbox_id: str) -> None:
        return None

    async def reap_all(self, keep: Mapping[Backend, AbstractSet[str]] | None = None) -> set[str]:
        return set(await self.microvm.reap(keep=set((keep or {}).get(Backend.MICROVM, ()))))


def isolated_settings(base: Path) -> Settings:
    """Settings of a server of its own under `base` (the shared build cache)."""
    return Settings(
        state_dir=base / "state", runtime_dir=base / "run", cache_dir=Settings().cache_dir
    )


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, provider: HostRuntimes | None = None
) -> AsyncIterator[Client]:
    """`tartarus serve` in this process, on a unix socket in the runtime dir; yields a
    client for it and stops the server (and its sandboxes) at the end."""
    ready, stop = anyio.Event(), anyio.Event()
    sock = settings.runtime_dir / "test.sock"
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: serve(
                settings,
                ServeOptions(socket=sock, grace_s=1),
                provider=provider,
                on_ready=lambda _: ready.set(),
                stop=stop,
            )
        )
        with anyio.fail_after(60):
            await ready.wait()
        client = Client(Endpoint.unix(sock))
        try:
            yield client
        finally:
            await client.close()
            stop.set()


async def run_cli(client: Client, *args: str, check: bool = True) -> tuple[int, str, str]:
    """`tartarus ARGS --url` the server `client` talks to; returns (code, out, err)."""
    assert client.endpoint.path is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARTARUS_")}
    proc = await anyio.run_process(
        [sys.executable, "-m", "tartarus", *args, "--url", f"unix:{client.endpoint.path}"],
        env=env,
        check=False,
    )
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
