"""How the network layer (Styx) addresses sandboxes: `[network]` in tartarus.toml."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

# Smallest pool worth having: 64 links of four addresses.
_MAX_POOL_PREFIX = 24


class EnforcerChoice(StrEnum):
    AUTO = "auto"  # eBPF where it loads, else nftables (the doctor says which)
    EBPF = "ebpf"  # eBPF or fail
    NFTABLES = "nftables"


class NetworkSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # IPv4 range the links of networked sandboxes are cut from: one /30 per sandbox
    # (the host's end takes the first address, the sandbox the second). Every server
    # on a host must use the same pool (the leases below are shared).
    pool: str = "10.213.0.0/16"
    # Host-wide lease files, one per link: every Tartarus server on the host allocates
    # from here, so two servers never hand out one address.
    leases_dir: Path = Path("/run/tartarus/net")
    # Bandwidth of each networked sandbox, each way, in Mbit/s (a tc token bucket at
    # each end of its link); none: unlimited.
    bandwidth_mbit: Annotated[int, Meta(ge=1)] | None = None
    # Give each networked sandbox a resolver on the host (`tartarus.network.dns`): it
    # answers the names the sandbox's egress list allows, and lets their addresses
    # through; without it the sandbox's `/etc/resolv.conf` is the template's.
    dns: bool = True
    # Where that resolver forwards queries (an IPv4 address); none: the host's first
    # `nameserver` in /etc/resolv.conf.
    dns_upstream: str | None = None
    # What enforces each sandbox's egress rules in the kernel: a tc eBPF classifier on its
    # link, or nftables chains. Every server on a host should choose the same.
    enforcer: EnforcerChoice = EnforcerChoice.AUTO

    def __post_init__(self) -> None:
        try:
            network = ipaddress.IPv4Network(self.pool)
        except ValueError as e:
            raise ValueError(f"network.pool: {e}") from e
        if network.prefixlen > _MAX_POOL_PREFIX:
            raise ValueError(
                f"network.pool {self.pool} is too small: at most a /{_MAX_POOL_PREFIX}"
            )

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pool)
