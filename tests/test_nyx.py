"""Nyx: snapshots in the blob store, restores, incremental snapshots, deletion with
garbage collection, warm pools, fork and checkpoint-on-stop, through the service, the
HTTP API, the SDK and the CLI.

The sandboxes are real microVMs: `tartarus-vmm` restoring probe-guest snapshots (this
host's KVM cannot boot Linux, but restores need no boot). `ProbeRuntimes` is the
runtime provider: the real microVM runtime for every spec. gVisor end to end is in
`test_nyx_gvisor.py`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from tartarus.api.types import CreateSandboxRequest
from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.images.store import TemplateStore
from tartarus.runtime.microvm import MicroVmRuntime, MicroVmSandbox
from tartarus.runtime.types import Backend, SandboxSpec
from tartarus.sdk.client import Client
from tartarus.sdk.errors import NotFoundError
from tartarus.sdk.sandbox import Sandbox
from tartarus.sdk.snapshots import Snapshots
from tartarus.server.serve import state_db_path
from tartarus.snapshots.catalog import SnapshotCatalog, SnapshotPurpose
from tartarus.snapshots.pools import WarmPools
from tartarus.snapshots.service import SandboxFacts, SnapshotService
from tests.support.probe_guests import build_probe_guest, xorshift_result
from tests.support.snapshots import (
    ProbeRuntimes,
    end_leftover_vmms,
    isolated_settings,
    our_vmms,
    run_cli,
    serving,
    snapshot_spinning,
    snapshot_when,
    until,
    wait_for,
)

pytestmark = [pytest.mark.timeout(240), pytest.mark.anyio]

TEMPLATE = "probe"
LONG_ROUNDS = 200_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path)


@pytest.fixture
async def runtimes(
    settings: Settings, doctor_report: DoctorReport, tmp_path: Path
) -> AsyncIterator[ProbeRuntimes]:
    if not doctor_report.kernel.kvm.openable:
        pytest.skip(f"no usable /dev/kvm: {doctor_report.kernel.kvm.detail}")
    yield ProbeRuntimes(settings, MicroVmRuntime(settings=settings, doctor=doctor_report))
    # A test that failed half-way must not leave VMMs running on the machine.
    await end_leftover_vmms(tmp_path)


@pytest.fixture
async def probe_dir(tmp_path: Path) -> Path:
    """A probe guest's full snapshot, paused mid-computation, as a backend writes it.
    The computation has seconds left, so restored sandboxes are still running when the
    test snapshots them."""
    directory = tmp_path / "probe-snapshot"
    await anyio.Path(directory).mkdir()
    program = f"gen {LONG_ROUNDS}"
    await snapshot_when(build_probe_guest(), tmp_path, directory / "vm.snap", program, ".")
    return directory


@pytest.fixture
async def spin_dir(tmp_path: Path) -> Path:
    """A probe guest that runs until stopped, as a full snapshot."""
    directory = tmp_path / "spin-snapshot"
    await anyio.Path(directory).mkdir()
    await snapshot_spinning(build_probe_guest(), tmp_path, directory / "vm.snap")
    return directory


@pytest.fixture
def service(settings: Settings, runtimes: ProbeRuntimes) -> SnapshotService:
    templates = TemplateStore(settings)
    catalog = SnapshotCatalog(state_db_path(settings))
    return SnapshotService(catalog, templates.blobs, runtimes)


FACTS = SandboxFacts(template=TEMPLATE)


async def finished_output(sandbox: MicroVmSandbox) -> str:
    """Waits for the restored probe guest to print its whole result line; returns its
    console."""
    return await wait_for(sandbox.run_dir / "console.log", "compute=", whole_line=True)


def blob_dirs(settings: Settings) -> set[str]:
    trees = settings.state_dir / "images" / "trees" / "sha256"
    return {p.name for p in trees.iterdir()} if trees.is_dir() else set()


# ---- the service ---------------------------------------------------------------------


async def test_snapshots_chain_and_their_files_go_when_nothing_holds_them(
    service: SnapshotService, probe_dir: Path, settings: Settings, tmp_path: Path
) -> None:
    base = await service.adopt(probe_dir, Backend.MICROVM, FACTS)
    assert base.blob_kind == "tree" and base.parent is None
    assert blob_dirs(settings) == {base.blob.removeprefix("sha256:")}

    spec = SandboxSpec(id="sb-00000000000000a1", template=TEMPLATE)
    first, runtime, facts, _ = await service.restore(base.id, spec)
    assert runtime.backend is Backend.MICROVM and facts.origin is not None
    assert service.get(base.id).verified, "the first restore checked the memory"
    assert isinstance(first, MicroVmSandbox)
    # A restored sandbox's snapshot is incremental: only what it changed, on its base.
    child = await service.take(first, facts, purpose=SnapshotPurpose.USER, label="child")
    assert child.parent == base.id and child.parent_blob == base.blob
    assert child.source_sandbox == first.id
    assert child.size_bytes < base.size_bytes

    # Deleting the base keeps its files: the child and the running sandbox need them.
    await service.delete(base.id)
    assert base.blob.removeprefix("sha256:") in blob_dirs(settings)
    await first.kill()
    await service.release(first.id)

    second, _, _, _ = await service.restore(
        child.id, SandboxSpec(id="sb-00000000000000a2", template=TEMPLATE)
    )
    assert isinstance(second, MicroVmSandbox)
    out = await finished_output(second)
    assert f"compute={xorshift_result(LONG_ROUNDS):016x}" in out
    await second.kill()
    await service.release(second.id)

    gc = await service.delete(child.id)
    assert blob_dirs(settings) == set(), "every file went with the last holder"
    assert gc.freed_bytes > 0
    assert service.catalog.records() == []
    assert not our_vmms(tmp_path)


async def test_missing_snapshots_and_orphaned_holds(
    service: SnapshotService, probe_dir: Path, settings: Settings
) -> None:
    with pytest.raises(Exception, match="no snapshot snap-0000000000000000"):
        await service.restore("snap-0000000000000000", SandboxSpec(id="sb-00000000000000b1"))
    record = await service.adopt(probe_dir, Backend.MICROVM, FACTS)
    await service.blobs.add_refs("sandbox-snapshot:sb-gone", [record.blob])
    await service.delete(record.id)
    assert blob_dirs(settings), "a dead sandbox's hold keeps the files"
    assert await service.release_orphans() == 1
    assert blob_dirs(settings) == set()


async def test_warm_pool_keeps_k_ready_and_hands_them_over(
    service: SnapshotService, probe_dir: Path, tmp_path: Path
) -> None:
    template = await service.adopt(
        probe_dir, Backend.MICROVM, FACTS, purpose=SnapshotPurpose.TEMPLATE
    )
    pools = WarmPools(service, service.catalog, {TEMPLATE: 2})

    async def ready(n: int) -> None:
        async def check() -> bool:
            info = pools.pool(TEMPLATE)
            return info is not None and info.ready == n

        await until(check)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pools.run)
        await ready(2)
        assert pools.pool(TEMPLATE).snapshot_id == template.id  # type: ignore[union-attr]
        hit = pools.claim(CreateSandboxRequest(template=TEMPLATE))
        assert hit is not None and hit.reason.startswith("warm pool hit")
        assert pools.claim(CreateSandboxRequest(template=TEMPLATE, env={"A": "1"})) is None
        assert pools.claim(CreateSandboxRequest(template="other")) is None
        await ready(2)  # refilled in the background
        info = pools.pool(TEMPLATE)
        assert info is not None and (info.hits, info.misses) == (1, 1)
        pools.set_target(TEMPLATE, 0)
        await ready(0)
        tg.cancel_scope.cancel()
    await pools.close()
    assert hit is not None
    await hit.sandbox.kill()
    await service.release(hit.sandbox.id)
    assert not our_vmms(tmp_path)
    assert service.catalog.pools()[0].size == 0, "the API's target is kept"


# ---- the server, the SDK and the CLI --------------------------------------------------


@pytest.fixture
async def server(
    settings: Settings, runtimes: ProbeRuntimes, spin_dir: Path
) -> AsyncIterator[tuple[Client, str]]:
    """A real server (in this process) over the probe runtime, with one template
    snapshot filed before it starts. Yields a client and the snapshot's id."""
    seed = SnapshotService(
        SnapshotCatalog(state_db_path(settings)), TemplateStore(settings).blobs, runtimes
    )
    record = await seed.adopt(spin_dir, Backend.MICROVM, FACTS, purpose=SnapshotPurpose.TEMPLATE)
    seed.catalog.close()
    async with serving(settings, runtimes) as client:
        yield client, record.id


async def test_sdk_restore_snapshot_fork_and_delete(
    server: tuple[Client, str], settings: Settings, tmp_path: Path
) -> None:
    client, snapshot_id = server
    snaps = Snapshots(client, owns_client=False)
    sb = await Sandbox.create(from_snapshot=snapshot_id, client=client, timeout=120)
    assert sb.info.template == TEMPLATE and sb.info.backend is Backend.MICROVM
    assert sb.info.backend_reason == f"restored from snapshot {snapshot_id}"

    taken = await sb.snapshot(label="mine", metadata={"k": "v"})
    assert taken.parent == snapshot_id and taken.source_sandbox == sb.id
    assert (taken.label, taken.metadata) == ("mine", {"k": "v"})

    forks = await sb.fork(count=3)
    assert len({f.id for f in forks} | {sb.id}) == 4
    assert all(f.info.metadata["tartarus.forked_from"] == sb.id for f in forks)
    # The fork's own snapshot is gone; the copies hold its files while they run.
    entries = await snaps.list()
    assert {e.id for e in entries} == {snapshot_id, taken.id}
    for f in forks:
        await f.kill()
    await sb.kill()

    restored = await snaps.restore(taken.id, timeout=60)
    assert restored.info.state.value == "running"
    await restored.kill()

    await snaps.delete(taken.id)
    with pytest.raises(NotFoundError):
        await snaps.get(taken.id)
    with pytest.raises(NotFoundError):
        await Sandbox.create(from_snapshot="snap-00000000000000ff", client=client)
    assert not our_vmms(tmp_path), "every restored VMM ended with its sandbox"


async def test_pool_hits_checkpoint_on_stop_and_prune(
    server: tuple[Client, str], tmp_path: Path
) -> None:
    client, snapshot_id = server
    snaps = Snapshots(client, owns_client=False)
    info = await snaps.set_pool(TEMPLATE, 1)
    assert (info.template, info.target) == (TEMPLATE, 1)

    async def one_ready() -> bool:
        return (await snaps.pools())[0].ready >= 1

    await until(one_ready)
    sb = await Sandbox.create(TEMPLATE, client=client, checkpoint_on_stop=True)
    assert sb.info.backend_reason.startswith("warm pool hit")
    assert (await snaps.pools())[0].hits == 1

    await sb.kill()
    checkpoints = await snaps.list(purposes=[SnapshotPurpose.TERMINATE])
    assert [c.source_sandbox for c in checkpoints] == [sb.id]

    dry = await snaps.prune(keep=0, dry_run=True)
    assert dry.removed == [checkpoints[0].id] and dry.dry_run
    done = await snaps.prune(keep=0)
    assert done.removed == [checkpoints[0].id] and done.freed_bytes > 0
    assert [e.id for e in await snaps.list()] == [snapshot_id], "template snapshots stay"
    await snaps.set_pool(TEMPLATE, 0)


async def test_cli_lists_inspects_and_removes(server: tuple[Client, str]) -> None:
    client, snapshot_id = server

    async def cli(*args: str, check: bool = True) -> tuple[int, str, str]:
        return await run_cli(client, *args, check=check)

    _, out, _ = await cli("snapshot", "list", "--json")
    listed = msgspec.json.decode(out)
    assert [e["id"] for e in listed] == [snapshot_id]
    _, out, _ = await cli("snapshot", "inspect", snapshot_id)
    assert msgspec.json.decode(out)["purpose"] == "template"
    _, out, _ = await cli("snapshot", "restore", snapshot_id, "--json")
    (restored,) = msgspec.json.decode(out)
    assert re.fullmatch(r"sb-[0-9a-f]{16}", restored["id"])
    _, out, _ = await cli("snapshot", "create", restored["id"], "--json")
    child = msgspec.json.decode(out)
    assert child["parent"] == snapshot_id
    _, out, _ = await cli("snapshot", "prune", "--keep", "0", "--dry-run", "--json")
    dry = msgspec.json.decode(out)
    assert dry["removed"] == [child["id"]] and dry["dry_run"], "template snapshots stay"
    code, _, err = await cli("snapshot", "prune", "--older-than", "soon", check=False)
    assert code == 2 and "soon" in err
    _, out, _ = await cli("snapshot", "list", "-p", "user", "-q")
    assert out.split() == [child["id"]], "a dry run deletes nothing"
    _, out, _ = await cli("snapshot", "rm", child["id"], "--json")
    assert msgspec.json.decode(out) == {"removed": [child["id"]]}
    code, _, err = await cli("snapshot", "inspect", child["id"], check=False)
    assert code == 3 and "not found" in err
    code, _, err = await cli("snapshot", "prune", check=False)
    assert code == 2 and "--older-than" in err
    _, out, _ = await cli("pool", "ls", "--json")
    assert msgspec.json.decode(out) == []
    _, out, _ = await cli("pool", "set", TEMPLATE, "0", "--json")
    assert msgspec.json.decode(out)["target"] == 0
    code, _, err = await cli("pool", "set", TEMPLATE, "65", check=False)
    assert code == 2 and "65" in err
    await (await Sandbox.connect(restored["id"], client=client)).kill()
