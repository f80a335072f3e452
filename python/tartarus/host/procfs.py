"""What `/proc` says about a host process."""

from __future__ import annotations

import os
from pathlib import Path

import anyio


def process_alive(pid: int) -> bool:
    """True while `pid` runs: a zombie has finished (its parent just has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which may itself hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    return bool(fields) and fields[0] not in ("Z", "X")


async def exited(pid: int) -> None:
    """Returns once `pid` has exited; it need not be our child (a pidfd says)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        # No pidfds (a kernel before 5.3, or out of descriptors): look every 20 ms.
        while process_alive(pid):  # noqa: ASYNC110 - nothing to wait on
            await anyio.sleep(0.02)
        return
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)
