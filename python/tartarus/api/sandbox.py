"""What a sandbox is, as both sides of the wire see it: its backend, trust level and
state, the resources it asks for, its output streams and the file entries it lists.

A leaf module (msgspec only): the SDK, the API's bodies and the runtime all name these
types, and a client that imports them loads nothing of the server.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import msgspec


class Backend(StrEnum):
    MICROVM = "microvm"
    GVISOR = "gvisor"
    JAIL = "jail"
    WASM = "wasm"
    AUTO = "auto"


class TrustLevel(StrEnum):
    """How much the caller trusts the workload; `auto` only picks `jail` for `trusted`
    work unless policy says otherwise."""

    UNTRUSTED = "untrusted"
    TRUSTED = "trusted"


class SandboxState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    FAILED = "failed"


class Ending(StrEnum):
    """How a sandbox ended."""

    # Stopped when asked (a delete, the server's shutdown, a policy): with a grace
    # period, every process exited after its SIGTERM within it.
    STOPPED = "stopped"
    # Stopped when asked, but some process outlived the grace period and was killed.
    KILLED_AFTER_GRACE = "killed_after_grace"
    # Ended at once, with no grace period.
    KILLED = "killed"
    TIMED_OUT = "timed_out"
    # Ended by itself: its agent, init or VM went away.
    EXITED = "exited"
    # The host's OOM killer ended it.
    OOM = "oom"
    # It never ran, or its server died and it was reaped.
    FAILED = "failed"


class OnTimeout(StrEnum):
    """What a sandbox's timeout does to it."""

    KILL = "kill"
    PAUSE = "pause"


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    vcpus: float = 1.0
    memory_mib: int = 512
    disk_mib: int = 1024
    pids: int = 256


Stream = Literal["stdout", "stderr"]


class FileKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"


class FileInfo(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    name: str
    kind: FileKind
    size: int
    mode: int
    mtime: float
