"""The nftables enforcer of the egress rules: one `inet tartarus` table, shared by every
Tartarus server on the host, and nothing outside it touched.

Base chains (rewritten atomically by `ensure`, so every server agrees on them):

- `forward` (filter, before the default priority): a packet from a sandbox link jumps
  to that link's chain through the `egress` verdict map; a link with no chain drops
  everything (a link is attached before it is brought up, so this is only a guard);
  nothing may open a connection into a sandbox;
- `input`: a sandbox may answer connections the host opened, and send nothing else to
  the host (any of its addresses): the link's `to_host_<if>` chain counts and drops;
- `postrouting` (NAT): traffic from the pools (`pools` set) leaving by any interface
  that is not a sandbox link is masqueraded.

Per link `<if>`: chains `egress_<if>` and `to_host_<if>`, counters `denied_<if>` and
`spoofed_<if>`, and a set `named_<if>_<k>` per host-name entry `k`, filled with the
addresses the sandbox's resolver answered (each element expires with its TTL).
Sandboxes are IPv4 only: every IPv6 packet from a link is dropped.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from typing import Final

import anyio

from tartarus.errors import TartarusError
from tartarus.network import libnftables
from tartarus.network.egress import (
    Drops,
    EgressRules,
    LinkAddresses,
    PortRange,
    Rule,
    Verdict,
    resolved_allowed,
)

log = logging.getLogger(__name__)

TABLE: Final = "tartarus"
FAMILY: Final = "inet"
# Host ends of sandbox links are named `<LINK_PREFIX><n>`.
LINK_PREFIX: Final = "ttv"
# Ahead of the usual filter chains (priority 0), so a host firewall's accept does not
# let a sandbox past ours; a drop anywhere still drops.
PRIORITY: Final = -10
NFT_TIMEOUT_S: Final = 30.0
PASSED_TO_HOST: Final = "to_host_passed"


class NftError(TartarusError):
    """nft refused a change; the message carries its error."""


async def nft(script: str | None = None, *args: str) -> bytes:
    """Runs an nft script (as `nft -f -`), or `nft [-j] COMMAND...`; returns its output.
    In-process through libnftables where it loads (`tartarus.network.libnftables`),
    else with the `nft` command."""
    library = libnftables.load()
    words = [a for a in args if a != "-j"]
    if library is not None and not any(w.startswith("-") for w in words):
        commands = script if script is not None else " ".join(words) + "\n"
        ok, output, error = await anyio.to_thread.run_sync(
            functools.partial(library.run, commands, json="-j" in args)
        )
    else:
        command = ["nft", *(["-f", "-"] if script is not None else args)]
        with anyio.fail_after(NFT_TIMEOUT_S):
            result = await anyio.run_process(
                command, input=script.encode() if script is not None else None, check=False
            )
        ok, output, error = result.returncode == 0, result.stdout, result.stderr
    if not ok:
        detail = error.decode(errors="replace").strip()
        raise NftError(f"nft {' '.join(args) or '-f -'} failed: {detail[-800:]}")
    return output


def _t(kind: str) -> str:
    return f"{kind} {FAMILY} {TABLE}"


def _base(pools: list[ipaddress.IPv4Network]) -> str:
    links = f'"{LINK_PREFIX}*"'
    lines = [
        f"add table {FAMILY} {TABLE}",
        f"add map {FAMILY} {TABLE} egress {{ type ifname : verdict ; }}",
        f"add map {FAMILY} {TABLE} to_host {{ type ifname : verdict ; }}",
        f"add set {FAMILY} {TABLE} pools {{ type ipv4_addr ; flags interval ; }}",
        *(f"add element {FAMILY} {TABLE} pools {{ {p} }}" for p in pools),
    ]
    chains = {
        "forward": (
            f"type filter hook forward priority {PRIORITY} ; policy accept ;",
            [
                "iifname vmap @egress",
                f"iifname {links} drop",
                f"oifname {links} ct state established,related accept",
                f"oifname {links} drop",
            ],
        ),
        "input": (
            f"type filter hook input priority {PRIORITY} ; policy accept ;",
            [
                f"iifname {links} ct state established,related accept",
                "iifname vmap @to_host",
                f"iifname {links} drop",
            ],
        ),
        "postrouting": (
            "type nat hook postrouting priority srcnat ; policy accept ;",
            [f"ip saddr @pools oifname != {links} masquerade"],
        ),
    }
    # Packets to the host from links another enforcer filters: after the established
    # ones (above it, in `input`), only what opens a query to the resolver's port (that
    # enforcer checked the address; it lets every TCP segment with ACK through, which
    # only a known connection may carry).
    passed = f"{FAMILY} {TABLE} {PASSED_TO_HOST}"
    lines += [
        f"add chain {passed}",
        f"flush chain {passed}",
        f"add rule {passed} udp dport 53 accept",
        f"add rule {passed} tcp dport 53 tcp flags & (syn | ack) == syn accept",
        f"add rule {passed} drop",
    ]
    for name, (head, rules) in chains.items():
        lines.append(f"add chain {FAMILY} {TABLE} {name} {{ {head} }}")
        lines.append(f"flush chain {FAMILY} {TABLE} {name}")
        lines += [f"add rule {FAMILY} {TABLE} {name} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"


def _ports(ports: PortRange | None) -> str:
    if ports is None:
        return ""
    span = str(ports.first) if ports.first == ports.last else f"{ports.first}-{ports.last}"
    return f" meta l4proto {{ tcp, udp }} th dport {span}"


def _match(rule: Rule) -> str:
    network = ipaddress.ip_network(rule.network)
    family = "ip" if network.version == 4 else "ip6"
    return f"{family} daddr {network}{_ports(rule.ports)}"


def _verdict(verdict: Verdict, counter: str) -> str:
    if verdict is Verdict.DROP:
        return f'counter name "{counter}" drop'
    return "accept"


def link_script(link: LinkAddresses, rules: EgressRules) -> str:
    """The nft commands that (re)create one link's chains, counters and map entries."""
    ifname = link.host_if
    egress, to_host = f"egress_{ifname}", f"to_host_{ifname}"
    denied, spoofed = f"denied_{ifname}", f"spoofed_{ifname}"
    lines = [
        f"add counter {FAMILY} {TABLE} {denied}",
        f"add counter {FAMILY} {TABLE} {spoofed}",
    ]
    for k in range(len(rules.names)):
        lines.append(
            f"add set {FAMILY} {TABLE} named_{ifname}_{k} {{ type ipv4_addr ; flags timeout ; }}"
        )
    named = [
        f"ip daddr @named_{ifname}_{k}{_ports(name.ports)} accept"
        for k, name in enumerate(rules.names)
    ]
    body: list[str] = [
        # Sandboxes are IPv4 only (no IPv6 address or route is given to them).
        f'meta nfproto ipv6 counter name "{denied}" drop',
        f'ip saddr != {link.sandbox_address} counter name "{spoofed}" drop',
        # Other sandboxes, of any server on this host.
        f'ip daddr @pools counter name "{denied}" drop',
        *(f"{_match(r)} {_verdict(r.verdict, denied)}" for r in rules.rules),
        # After the denied ranges: what a resolver answers never opens them.
        *named,
        _verdict(rules.otherwise, denied),
    ]
    to_host_body = [
        f'ip saddr != {link.sandbox_address} counter name "{spoofed}" drop',
        *(
            [f"ip daddr {link.resolver} meta l4proto {{ tcp, udp }} th dport 53 accept"]
            if link.resolver is not None
            else []
        ),
        f'counter name "{denied}" drop',
    ]
    for chain, chain_rules in ((egress, body), (to_host, to_host_body)):
        lines.append(f"add chain {FAMILY} {TABLE} {chain}")
        lines.append(f"flush chain {FAMILY} {TABLE} {chain}")
        lines += [f"add rule {FAMILY} {TABLE} {chain} {r}" for r in chain_rules]
    for map_name, chain in (("egress", egress), ("to_host", to_host)):
        lines.append(f'add element {FAMILY} {TABLE} {map_name} {{ "{ifname}" : jump {chain} }}')
    return "\n".join(lines) + "\n"


async def _delete(commands: list[str]) -> None:
    try:
        # One transaction in the usual case (each nft run costs milliseconds)...
        await nft("\n".join(commands) + "\n")
    except NftError:
        # ... and one per object when some are gone already (a half-made link, a second
        # reap), so what is gone does not keep the rest.
        for command in commands:
            try:
                await nft(command + "\n")
            except NftError as e:
                log.debug("%s", e)


class NftablesEnforcer:
    """`EgressEnforcer` on nftables. `pools`: the address pools of sandbox links (traffic
    from them is masqueraded, and no sandbox reaches another)."""

    def __init__(self, pools: list[ipaddress.IPv4Network]) -> None:
        self._pools = pools
        self._ready = False
        self._lock = anyio.Lock()

    async def ensure(self) -> None:
        """Creates the table and rewrites its base chains (once per process)."""
        async with self._lock:
            if not self._ready:
                await nft(_base(self._pools))
                self._ready = True

    async def attach(self, link: LinkAddresses, rules: EgressRules) -> None:
        await self.ensure()
        await nft(link_script(link, rules))

    async def allow_resolved(
        self, host_if: str, name: int, records: list[tuple[str, int]], ports: PortRange | None
    ) -> None:
        # The set's rule carries the ports.
        elements = [f"{ip} timeout {ttl}s" for ip, ttl in resolved_allowed(records, self._pools)]
        if elements:
            await nft(
                f"add element {FAMILY} {TABLE} named_{host_if}_{name} {{ {', '.join(elements)} }}\n"
            )

    async def detach(self, host_if: str) -> None:
        """Removes what exists of the link's objects (its chains, counters and sets, or
        the entries `pass_through` made), in one transaction."""
        if not self._ready and not await self._table_exists():
            return
        items = await self._list()
        named = {
            (kind, str(found.get("name", "")))
            for item in items
            for kind, found in item.items()
            if kind in ("chain", "counter", "set") and isinstance(found, dict)
        }
        owned = {
            ("chain", f"egress_{host_if}"),
            ("chain", f"to_host_{host_if}"),
            ("counter", f"denied_{host_if}"),
            ("counter", f"spoofed_{host_if}"),
        }
        commands = [
            f'delete element {FAMILY} {TABLE} {m} {{ "{host_if}" }}'
            for m, elements in self._elements(items).items()
            if host_if in elements
        ]
        # Chains after the map entries that jump to them.
        commands += [
            f"delete {kind} {FAMILY} {TABLE} {name}"
            for kind, name in sorted(named)
            if (kind, name) in owned or (kind == "set" and name.startswith(f"named_{host_if}_"))
        ]
        if commands:
            await _delete(commands)

    async def pass_through(self, host_if: str) -> None:
        """Lets the link's packets past this table's per-link filtering (another enforcer
        filters them): its `egress` entry accepts, its `to_host` entry jumps to the
        shared `to_host_passed` chain (conntrack's answers and the resolver). Inbound
        stays as the base chains say, and the NAT applies."""
        await self.ensure()
        await nft(
            f'add element {FAMILY} {TABLE} egress {{ "{host_if}" : accept }}\n'
            f'add element {FAMILY} {TABLE} to_host {{ "{host_if}" : jump {PASSED_TO_HOST} }}\n'
        )

    @staticmethod
    def _elements(items: list[dict[str, object]]) -> dict[str, dict[str, object]]:
        """The `egress` and `to_host` maps' entries: interface -> verdict."""
        out: dict[str, dict[str, object]] = {"egress": {}, "to_host": {}}
        for item in items:
            found = item.get("map")
            if not isinstance(found, dict) or found.get("name") not in out:
                continue
            elements = found.get("elem")
            for element in elements if isinstance(elements, list) else []:
                if isinstance(element, list) and len(element) == 2:
                    out[str(found["name"])][str(element[0])] = element[1]
        return out

    async def linked(self) -> set[str]:
        """Links with anything of theirs in this table (chains, or the entries
        `pass_through` made), from one listing."""
        items = await self._list()
        egress = self._elements(items)["egress"]
        passed = {name for name, verdict in egress.items() if verdict == {"accept": None}}
        return self._chained(items) | passed

    async def _table_exists(self) -> bool:
        try:
            await nft(None, "list", "table", FAMILY, TABLE)
        except NftError:
            return False
        return True

    async def _list(self) -> list[dict[str, object]]:
        try:
            out = await nft(None, "-j", "list", "table", FAMILY, TABLE)
        except NftError:
            return []
        items = json.loads(out).get("nftables", [])
        return [item for item in items if isinstance(item, dict)]

    async def drops(self) -> dict[str, Drops]:
        counts: dict[str, dict[str, int]] = {}
        for item in await self._list():
            counter = item.get("counter")
            if not isinstance(counter, dict):
                continue
            kind, _, ifname = str(counter.get("name", "")).partition("_")
            if kind in ("denied", "spoofed") and ifname:
                counts.setdefault(ifname, {})[kind] = int(counter.get("packets", 0))
        return {ifname: Drops(**c) for ifname, c in counts.items()}

    async def attached(self) -> set[str]:
        return self._chained(await self._list())

    @staticmethod
    def _chained(items: list[dict[str, object]]) -> set[str]:
        """Links with an `egress_<if>` chain."""
        out: set[str] = set()
        for item in items:
            chain = item.get("chain")
            if isinstance(chain, dict):
                name = str(chain.get("name", ""))
                if name.startswith(f"egress_{LINK_PREFIX}"):
                    out.add(name.removeprefix("egress_"))
        return out
