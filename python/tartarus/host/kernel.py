"""Kernel-level facts, probed in Rust by `tartarus._core.probe_host`.

The structs mirror the Rust report field for field; msgspec validates the shape so a
mismatch between the two sides fails loudly instead of printing nonsense.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import msgspec

from tartarus import _core


class KvmFlavour(StrEnum):
    HARDWARE = "hardware"
    EMULATED = "emulated"
    UNKNOWN = "unknown"
    UNAVAILABLE = "unavailable"


class KvmProbe(msgspec.Struct, frozen=True):
    device_present: bool
    openable: bool
    api_version: int | None
    flavour: KvmFlavour
    exception_delivered: bool | None
    full_guests: bool
    exit: str
    loop_ns_per_iteration: float | None
    detail: str


class CgroupMode(StrEnum):
    V2 = "v2"
    V1 = "v1"
    HYBRID = "hybrid"
    NONE = "none"


class Cgroups(msgspec.Struct, frozen=True):
    mode: CgroupMode
    v2_mount: str | None
    v1_controllers: list[str]


class Capability(msgspec.Struct, frozen=True):
    available: bool
    detail: str


class Memory(msgspec.Struct, frozen=True):
    total_bytes: int
    available_bytes: int


class Disk(msgspec.Struct, frozen=True):
    path: str
    free_bytes: int
    total_bytes: int


class KernelReport(msgspec.Struct, frozen=True):
    kernel: str
    arch: str
    cpus: int
    cpu_virt_flags: list[str]
    kvm: KvmProbe
    cgroups: Cgroups
    seccomp: Capability
    user_namespaces: Capability
    tun: Capability
    memory: Memory
    disk: Disk


def probe_kernel(disk_path: Path) -> KernelReport:
    """Runs the Rust probes (including a real KVM guest run) and validates the result."""
    return msgspec.convert(_core.probe_host(disk_path), KernelReport)
