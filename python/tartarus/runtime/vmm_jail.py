"""The microVM monitor's own jail: the `[vmm_jail]` settings and the `--jail` document
of `tartarus-vmm` (a mirror of `rust/vmm/src/jail.rs`).

Jailed, a VMM runs in its own mount, pid, network, ipc, uts and cgroup namespaces, in
a root holding only its bind mounts, in a cgroup limiting memory (guest RAM plus
overhead), pids and CPU, as an unprivileged uid/gid with no capabilities and
`no_new_privs`, under its per-thread seccomp filters. Machine paths are then paths
inside the jail: `vmm_api.jail_machine` rewrites a machine configuration and lists the
bind mounts that make its files visible there.
"""

from __future__ import annotations

import hashlib
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

DEFAULT_CHROOT_BASE = "/run/tartarus/vmm-jail"
DEFAULT_CGROUP_PARENT = "tartarus/vmm"
DEFAULT_OVERHEAD_MIB = 64
DEFAULT_PIDS = 128


class JailMode(StrEnum):
    AUTO = "auto"  # jailed when running as root (the jail needs root), else not
    ALWAYS = "always"
    NEVER = "never"


class VmmJailSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[vmm_jail]`: how the microVM backend jails each `tartarus-vmm`."""

    mode: JailMode = JailMode.AUTO
    # Each sandbox's VMM runs as uid = gid = uid_base + (hash of the sandbox id) % uid_count;
    # no host account may live in that range.
    uid_base: Annotated[int, Meta(ge=1000, le=4_000_000_000)] = 1_900_000_000
    uid_count: Annotated[int, Meta(ge=1, le=2**16)] = 65_536
    # Where the jail root is mounted, in each VMM's own mount namespace (default:
    # RUNTIME_DIR/vmm-jail).
    chroot_base: Path | None = None
    cgroup_parent: str = DEFAULT_CGROUP_PARENT
    # Memory for the VMM and KVM's kernel memory, on top of guest RAM.
    overhead_mib: Annotated[int, Meta(ge=16)] = DEFAULT_OVERHEAD_MIB
    pids: Annotated[int, Meta(ge=8)] = DEFAULT_PIDS

    def enabled(self) -> bool:
        if self.mode is JailMode.AUTO:
            return os.geteuid() == 0
        return self.mode is JailMode.ALWAYS

    def uid_for(self, sandbox_id: str) -> int:
        digest = hashlib.sha256(sandbox_id.encode()).digest()
        return self.uid_base + int.from_bytes(digest[:8], "big") % self.uid_count


class BindMount(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    source: Path
    destination: str
    readonly: bool = True


class JailCgroup(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    parent: str = DEFAULT_CGROUP_PARENT
    # The largest guest RAM the VMM may be configured with; the memory limit is this
    # plus `overhead_mib`.
    guest_memory_mib: int | None = None
    overhead_mib: int = DEFAULT_OVERHEAD_MIB
    pids: int = DEFAULT_PIDS
    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000


class JailConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`tartarus-vmm --jail FILE`: `id` names the cgroup `<cgroup.parent>/<id>`."""

    id: str
    uid: int
    gid: int
    chroot_base: Path = Path(DEFAULT_CHROOT_BASE)
    mounts: list[BindMount] = msgspec.field(default_factory=list)
    cgroup: JailCgroup = msgspec.field(default_factory=JailCgroup)
    max_open_files: int = 1024


def jail_id(sandbox_id: str, workdir: Path) -> str:
    """A cgroup-safe name unique to this sandbox directory (two servers may run
    sandboxes with the same id)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in sandbox_id)
    digest = hashlib.sha256(str(workdir.absolute()).encode()).hexdigest()[:12]
    return f"{safe[:40] or 'vm'}-{digest}"


def sandbox_jail(
    settings: VmmJailSettings,
    *,
    sandbox_id: str,
    workdir: Path,
    runtime_dir: Path,
    mounts: list[BindMount],
    guest_memory_mib: int,
    vcpus: float,
) -> JailConfig:
    """The jail of one sandbox's VMM: its own uid, guest RAM plus overhead, `vcpus`
    cores of CPU time."""
    uid = settings.uid_for(sandbox_id)
    period = 100_000
    return JailConfig(
        id=jail_id(sandbox_id, workdir),
        uid=uid,
        gid=uid,
        chroot_base=settings.chroot_base or runtime_dir / "vmm-jail",
        mounts=mounts,
        cgroup=JailCgroup(
            parent=settings.cgroup_parent,
            guest_memory_mib=guest_memory_mib,
            overhead_mib=settings.overhead_mib,
            pids=settings.pids,
            cpu_quota_us=max(1000, int(vcpus * period)),
            cpu_period_us=period,
        ),
    )
