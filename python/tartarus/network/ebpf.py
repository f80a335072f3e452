"""The eBPF enforcer of the egress rules (Styx): a tc classifier on the host end of each
sandbox link (`rust/host/bpf/egress.bpf.c`, loaded by `tartarus-host::egress`).

Why tc on the link and not cgroup_skb on the sandbox's cgroup: every backend's packets
cross the link, whoever sends them (a jail's sockets, gVisor's netstack writing raw
frames, a microVM's TAP), while cgroup_skb sees only sockets of processes in the cgroup.

The classifier decides per packet from pinned maps (shared by every server on the host,
and kept across restarts): the link's source address and resolver, an LPM trie of the
link's networks with their port ranges, and the resolver's answers with their expiry.
Traffic to the host itself is found with the kernel's FIB lookup, so every host address
is covered, including ones added later. The nftables table keeps what is stateful or
host-wide (the NAT, and that nothing opens a connection into a sandbox) and lets the
link's packets through (`NftablesEnforcer.pass_through`).

First-match rules become longest-prefix entries by `lpm_rules`: an address's longest
matching network carries, in order, the port ranges of every rule whose network holds
it, so the lookup gives the same verdict the ordered list would.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Final

import anyio

from tartarus import _core
from tartarus.errors import TartarusError
from tartarus.network.egress import (
    Drops,
    EgressError,
    EgressRules,
    LinkAddresses,
    PortRange,
    Verdict,
    resolved_allowed,
)
from tartarus.network.nftables import NftablesEnforcer

log = logging.getLogger(__name__)

# Where the maps are pinned; the suffix changes with their layout, so a server of another
# layout never opens these.
PIN_DIR: Final = Path("/sys/fs/bpf/tartarus/egress-v1")
# Port ranges the classifier walks for one network (MAX_RANGES in the C file).
MAX_RANGES: Final = 32

# (first, last, accept); first == 0 matches every packet.
Ranges = list[tuple[int, int, bool]]


class EbpfUnavailableError(TartarusError):
    """The eBPF filter cannot be loaded on this host (the message says why)."""


def lpm_rules(
    rules: EgressRules, pools: list[ipaddress.IPv4Network]
) -> list[tuple[ipaddress.IPv4Network, Ranges]]:
    """The trie entries equivalent to `pools` (dropped: other sandboxes) then `rules`,
    first match winning. IPv6 rules are left out: the classifier drops IPv6."""
    ordered: list[tuple[ipaddress.IPv4Network, PortRange | None, bool]] = [
        (pool, None, False) for pool in pools
    ]
    for rule in rules.rules:
        network = ipaddress.ip_network(rule.network)
        if isinstance(network, ipaddress.IPv4Network):
            ordered.append((network, rule.ports, rule.verdict is Verdict.ACCEPT))
    entries: list[tuple[ipaddress.IPv4Network, Ranges]] = []
    for prefix in dict.fromkeys(network for network, _, _ in ordered):
        ranges: Ranges = []
        for network, ports, accept in ordered:
            if not prefix.subnet_of(network):
                continue
            span = (0, 65535) if ports is None else (ports.first, ports.last)
            if not any(r[:2] == span for r in ranges):  # a repeat never matches
                ranges.append((*span, accept))
            if ports is None:
                break  # matches everything: nothing after it is reached
        if len(ranges) > MAX_RANGES:
            raise EgressError(
                f"{prefix}: {len(ranges)} port rules apply to it, more than the eBPF "
                f"filter's {MAX_RANGES}; merge entries or set [network] enforcer = "
                '"nftables"'
            )
        entries.append((prefix, ranges))
    return entries


class EbpfEnforcer:
    """`EgressEnforcer` on the tc classifier; `pools` as for `NftablesEnforcer`, whose
    table still carries the NAT and the inbound guard."""

    def __init__(self, pools: list[ipaddress.IPv4Network], pin_dir: Path = PIN_DIR) -> None:
        self._pools = pools
        self._pin_dir = pin_dir
        self.nft = NftablesEnforcer(pools)

    @staticmethod
    def probe(pin_dir: Path = PIN_DIR) -> str | None:
        """None if the filter loads here (blocking), else why not."""
        try:
            _core.egress_probe(pin_dir)
        except OSError as e:
            return str(e)
        return None

    async def attach(self, link: LinkAddresses, rules: EgressRules) -> None:
        entries = lpm_rules(rules, self._pools)
        flat = [(str(n.network_address), n.prefixlen, ranges) for n, ranges in entries]
        try:
            await anyio.to_thread.run_sync(
                _core.egress_attach,
                self._pin_dir,
                link.host_if,
                link.sandbox_address,
                link.resolver,
                rules.otherwise is Verdict.ACCEPT,
                flat,
            )
        except OSError as e:
            raise EbpfUnavailableError(
                f"cannot attach the egress filter to {link.host_if}: {e}"
            ) from e
        await self.nft.pass_through(link.host_if)

    async def allow_resolved(
        self, host_if: str, name: int, records: list[tuple[str, int]], ports: PortRange | None
    ) -> None:
        first, last = (0, 65535) if ports is None else (ports.first, ports.last)
        for address, ttl in resolved_allowed(records, self._pools):
            try:
                await anyio.to_thread.run_sync(
                    _core.egress_allow_resolved,
                    self._pin_dir,
                    host_if,
                    str(address),
                    first,
                    last,
                    float(ttl),
                )
            except OSError as e:
                # The link went away while the answer was on its way.
                log.debug("cannot allow %s for %s: %s", address, host_if, e)

    async def detach(self, host_if: str) -> None:
        # Also what a server that used the nftables enforcer left for this link.
        await self.nft.detach(host_if)
        try:
            await anyio.to_thread.run_sync(_core.egress_detach, self._pin_dir, host_if)
        except OSError as e:
            log.warning("cannot remove the egress rules of %s: %s", host_if, e)

    async def _links(self) -> list[tuple[str, int, int, int]]:
        try:
            return await anyio.to_thread.run_sync(_core.egress_links, self._pin_dir)
        except OSError as e:
            log.warning("cannot read the egress filter's maps: %s", e)
            return []

    async def drops(self) -> dict[str, Drops]:
        return {
            host_if: Drops(denied=denied, spoofed=spoofed)
            for host_if, _, denied, spoofed in await self._links()
        }

    async def attached(self) -> set[str]:
        return {host_if for host_if, *_ in await self._links()} | await self.nft.linked()
