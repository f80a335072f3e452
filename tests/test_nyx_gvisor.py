"""Nyx on gVisor, end to end: a real server, real `runsc checkpoint`/`restore`, the SDK.

The fork test: 20 clones of one gVisor checkpoint each see the parent's state (a file
and a running process) and then diverge independently.
"""

from __future__ import annotations

import importlib
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from tartarus.config import Settings
from tartarus.host.doctor import DoctorReport
from tartarus.images.store import TemplateStore
from tartarus.runtime.types import Backend
from tartarus.sdk.client import Client
from tartarus.sdk.errors import ConflictError, InvalidRequestError
from tartarus.sdk.sandbox import Sandbox
from tartarus.sdk.snapshots import Snapshots
from tartarus.snapshots.catalog import SnapshotPurpose
from tests.support.snapshots import isolated_settings, moved_past, run_cli, serving, until

pytestmark = [pytest.mark.timeout(600), pytest.mark.anyio]

# Renamed into place, so a reader never sees the file half-written.
COUNTER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count;"
    " sleep 0.05; done"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return isolated_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings, doctor_report: DoctorReport) -> AsyncIterator[Client]:
    # The gvisor backend ships in the wheel: a wheel without it fails here, not skips.
    importlib.import_module("tartarus.runtime.gvisor")
    verdict = doctor_report.backend("gvisor")
    if not verdict.available:
        pytest.skip(f"gvisor unavailable here: {verdict.reason}")
    async with serving(settings) as c:
        yield c


async def read(sb: Sandbox, path: str) -> str:
    return (await sb.commands.run(f"cat {path}")).stdout.strip()


async def test_twenty_forks_see_the_parent_and_diverge(client: Client) -> None:
    parent = await Sandbox.create("base", backend=Backend.GVISOR, client=client, timeout=600)
    try:
        await parent.commands.run("echo parent-state > /tmp/state")
        await parent.commands.run(COUNTER, background=True)

        async def counting() -> bool:
            return (await read(parent, "/tmp/count")).isdigit()

        await until(counting, timeout_s=30)

        forks = await parent.fork(count=20)
        assert len({f.id for f in forks}) == 20
        try:
            assert all(f.info.backend is Backend.GVISOR for f in forks)
            # The file and the counter process came along; then each copy goes its own
            # way. The copies are checked side by side.
            seen: dict[str, tuple[str, int, int, str]] = {}

            async def check(i: int, f: Sandbox) -> None:
                state = await read(f, "/tmp/state")
                before = int(await read(f, "/tmp/count"))
                await f.commands.run(f"echo clone-{i} > /tmp/state")

                # With 20 copies on a small CI machine one loop turn (a fork and an exec
                # of mv under ptrace) can outlast a single command: the copy is polled.
                async def count() -> int:
                    return int(await read(f, "/tmp/count"))

                after = await moved_past(count, before, timeout_s=120)
                seen[f.id] = (state, before, after, await read(f, "/tmp/state"))

            async with anyio.create_task_group() as tg:
                for i, f in enumerate(forks):
                    tg.start_soon(check, i, f)
            for i, f in enumerate(forks):
                state, before, after, mine = seen[f.id]
                assert state == "parent-state", f"copy {i} did not see the parent's file"
                assert after > before, f"copy {i}: the counter process stopped"
                assert mine == f"clone-{i}"
            assert await read(parent, "/tmp/state") == "parent-state"
        finally:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for f in forks:
                        tg.start_soon(f.kill)
    finally:
        await parent.kill()


async def test_snapshot_restore_and_delete_on_gvisor(client: Client) -> None:
    snaps = Snapshots(client, owns_client=False)
    sb = await Sandbox.create("base", backend=Backend.GVISOR, client=client)
    await sb.commands.run("echo kept > /tmp/mark")
    entry = await sb.snapshot(label="marked")
    assert entry.backend is Backend.GVISOR and entry.size_bytes > 0
    assert await read(sb, "/tmp/mark") == "kept", "the sandbox goes on after its snapshot"
    await sb.kill()
    restored = await snaps.restore(entry.id)
    try:
        assert await read(restored, "/tmp/mark") == "kept"
    finally:
        await restored.kill()
    await snaps.delete(entry.id)
    assert [e.id for e in await snaps.list()] == []


# The built-in `base` template with a warm-up that leaves a mark in the running sandbox
# (at build time the warm-up runs once more as a smoke test, read-only, /tmp a tmpfs).
WARM_TEMPLATE = """\
id: warm
base: {kind: debian, suite: bookworm, variant: none}
packages: [busybox-static]
env: {PATH: /usr/sbin:/usr/bin:/sbin:/bin}
shell: [/bin/busybox, sh, -c]
build: |
  set -e
  for d in bin sbin usr/bin usr/sbin etc root tmp; do /bin/busybox mkdir -p /$d; done
  /bin/busybox --install -s
  chmod 1777 /tmp
warmup: echo warmed-$((6 * 7)) > /tmp/warm
backends: [gvisor]
"""


async def test_template_snapshot_runs_the_warmup_and_fills_a_warm_pool(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "warm.yaml"
    source.write_text(textwrap.dedent(WARM_TEMPLATE))
    TemplateStore(settings).register(source)
    snaps = Snapshots(client, owns_client=False)

    # Bad input first: an unknown template, and a sandbox id together with --template.
    code, _, err = await run_cli(client, "snapshot", "create", "--template", "nosuch", check=False)
    assert code != 0 and "nosuch" in err
    code, _, err = await run_cli(client, "snapshot", "create", "sb-0", "-t", "warm", check=False)
    assert code == 2 and "not both" in err
    assert await snaps.list() == []

    # Start the template, run its warm-up, snapshot it: the snapshot holds the result.
    _, out, _ = await run_cli(client, "snapshot", "create", "--template", "warm", "--json")
    entry = msgspec.json.decode(out)
    assert (entry["template"], entry["purpose"]) == ("warm", SnapshotPurpose.TEMPLATE.value)
    assert entry["backend"] == Backend.GVISOR.value and entry["size_bytes"] > 0
    restored = await snaps.restore(entry["id"])
    try:
        assert await read(restored, "/tmp/warm") == "warmed-42"
    finally:
        await restored.kill()

    # A warm pool of that snapshot: creates of the template are hand-overs of sandboxes
    # that already ran the warm-up, and the pool refills behind them.
    await snaps.set_pool("warm", 1)

    async def ready(n: int) -> bool:
        return (await snaps.pools())[0].ready >= n

    await until(lambda: ready(1), timeout_s=120)
    hit = await Sandbox.create("warm", client=client)
    try:
        assert hit.info.backend_reason.startswith("warm pool hit"), hit.info.backend_reason
        assert await read(hit, "/tmp/warm") == "warmed-42"
        await until(lambda: ready(1), timeout_s=120)
        (pool,) = await snaps.pools()
        assert (pool.hits, pool.target) == (1, 1)
    finally:
        await hit.kill()
    await snaps.set_pool("warm", 0)
    await snaps.delete(entry["id"])
    assert await snaps.list() == []


async def test_backends_without_snapshots_and_bad_forks_are_refused(client: Client) -> None:
    snaps = Snapshots(client, owns_client=False)
    gvisor = await Sandbox.create("base", backend=Backend.GVISOR, client=client)
    try:
        for count in (0, 51):
            with pytest.raises(InvalidRequestError, match="count"):
                await gvisor.fork(count=count)
    finally:
        await gvisor.kill()
    jail = await Sandbox.create("base", backend=Backend.JAIL, client=client)
    try:
        with pytest.raises(ConflictError) as e:
            await jail.snapshot()
        assert e.value.type.endswith("/not-supported") and "jail" in e.value.detail
        with pytest.raises(ConflictError) as e:
            await jail.fork(count=2)
        assert e.value.type.endswith("/not-supported")
        assert (await jail.commands.run("echo still here")).stdout.strip() == "still here"
    finally:
        await jail.kill()
    assert await snaps.list() == [], "nothing half-made is left"
