"""How a microVM's exit reads: a reset is a clean stop only after the host asked for one."""

from __future__ import annotations

import pytest

from tartarus.api.sandbox import SandboxState
from tartarus.runtime.microvm import classify_exit


@pytest.mark.parametrize("reason", ["reset", "shutdown", "halt", "stopped"])
def test_an_exit_we_asked_for_is_a_clean_stop(reason: str) -> None:
    assert classify_exit(reason, requested=True) == (SandboxState.STOPPED, reason)


@pytest.mark.parametrize("reason", ["reset", "shutdown", "halt"])
def test_a_guest_that_ends_by_itself_has_failed(reason: str) -> None:
    # A panicking guest kernel (panic=1, reboot=k) resets the machine: not a clean stop.
    state, detail = classify_exit(reason, requested=False)
    assert state is SandboxState.FAILED
    assert "kernel panic" in detail


def test_the_vmm_stop_is_clean_even_unasked() -> None:
    assert classify_exit("stopped", requested=False)[0] is SandboxState.STOPPED


@pytest.mark.parametrize("reason", ["internal_error", "wall_clock_limit", "unknown"])
def test_other_exits_fail_whether_asked_or_not(reason: str) -> None:
    assert classify_exit(reason, requested=True) == (SandboxState.FAILED, reason)
