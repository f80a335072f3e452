"""Nyx on gVisor, end to end: a real server, real `runsc checkpoint`/`restore`, the SDK.

The fork test: 20 clones of one gVisor checkpoint each see the parent's state (a file
and a running process) and then diverge independently.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tartarus.host.doctor import DoctorReport
from tartarus.runtime.types import Backend
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox
from tartarus.sdk.snapshots import Snapshots
from tests.support.snapshots import isolated_settings, serving, until

pytestmark = [pytest.mark.timeout(600), pytest.mark.anyio]

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(tmp_path: Path, doctor_report: DoctorReport) -> AsyncIterator[Client]:
    if importlib.util.find_spec("tartarus.runtime.gvisor") is None:
        pytest.skip("this build has no gvisor backend (tartarus.runtime.gvisor)")
    verdict = doctor_report.backend("gvisor")
    if not verdict.available:
        pytest.skip(f"gvisor unavailable here: {verdict.reason}")
    async with serving(isolated_settings(tmp_path)) as c:
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
            for f in forks:
                assert f.info.backend is Backend.GVISOR
                assert await read(f, "/tmp/state") == "parent-state"
            # The counter process came along and keeps counting in every copy.
            before = {f.id: int(await read(f, "/tmp/count")) for f in forks}
            await anyio.sleep(0.5)
            for f in forks:
                assert int(await read(f, "/tmp/count")) > before[f.id]
            # Each copy goes its own way; the parent is untouched.
            for i, f in enumerate(forks):
                await f.commands.run(f"echo clone-{i} > /tmp/state")
            for i, f in enumerate(forks):
                assert await read(f, "/tmp/state") == f"clone-{i}"
            assert await read(parent, "/tmp/state") == "parent-state"
        finally:
            for f in forks:
                await f.kill()
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
