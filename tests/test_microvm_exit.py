"""How a microVM's exit reads (a reset is a clean stop only after the host asked for one),
and the host's list of a snapshot's disks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tartarus.api.sandbox import SandboxState
from tartarus.runtime.base import SandboxError
from tartarus.runtime.microvm import DRIVES_FILE, _host_drives, classify_exit


@pytest.mark.parametrize("reason", ["reset", "shutdown", "halt", "stopped"])
def test_an_exit_we_asked_for_is_a_clean_stop(reason: str) -> None:
    assert classify_exit(reason, requested=True) == (SandboxState.STOPPED, reason)


@pytest.mark.parametrize("reason", ["reset", "shutdown", "halt"])
def test_a_guest_that_ends_by_itself_has_failed(reason: str) -> None:
    # A panicking guest kernel (panic=1, reboot=k) resets the machine: not a clean stop.
    state, detail = classify_exit(reason, requested=False)
    assert state is SandboxState.FAILED
    assert "kernel panic" in detail


def test_what_the_vmm_saw_is_in_the_message() -> None:
    seen = "vcpu 1 triple fault at rip 0xffffffff81000000"
    state, detail = classify_exit("shutdown", requested=False, detail=seen)
    assert state is SandboxState.FAILED
    assert seen in detail
    assert classify_exit("shutdown", requested=True, detail=seen)[1] == "shutdown"


def test_the_vmm_stop_is_clean_even_unasked() -> None:
    assert classify_exit("stopped", requested=False)[0] is SandboxState.STOPPED


@pytest.mark.parametrize("reason", ["internal_error", "wall_clock_limit", "unknown"])
def test_other_exits_fail_whether_asked_or_not(reason: str) -> None:
    assert classify_exit(reason, requested=True) == (SandboxState.FAILED, reason)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "error"),
    [(b"{not json", "is damaged"), (b"[]", "names 0 disks; the snapshot has 2")],
)
async def test_a_snapshots_host_drive_list_is_checked(
    tmp_path: Path, content: bytes, error: str
) -> None:
    (tmp_path / DRIVES_FILE).write_bytes(content)
    with pytest.raises(SandboxError, match=error):
        await _host_drives(tmp_path, 2)


@pytest.mark.anyio
async def test_a_snapshot_without_a_host_drive_list_uses_its_own(tmp_path: Path) -> None:
    # Snapshots taken before the list existed (or by an unjailed VMM) restore as before.
    assert await _host_drives(tmp_path, 2) is None
