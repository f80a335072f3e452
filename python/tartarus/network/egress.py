"""What a networked sandbox may reach: the egress rule model, and the interface every
enforcer of it implements.

A policy's `network.egress` is a list of entries:

- an address or CIDR: `203.0.113.7`, `203.0.113.0/24`, `2001:db8::/32`;
- either with a port or port range: `203.0.113.7:443`, `203.0.113.0/24:8000-8100`,
  `[2001:db8::/32]:443` (ports match TCP and UDP);
- a host name, with or without a port: `pypi.org`, `pypi.org:443`, or a wildcard for
  its subdomains, `*.pythonhosted.org`: the addresses the sandbox's resolver (on the
  host, `tartarus.network.dns`) answers for it are allowed for the answer's TTL; a
  plain name is also resolved on the host when the sandbox is created.

Some destinations are denied whatever the list says, unless an entry names them: the
private ranges, link-local (the cloud metadata service lives there), CGNAT, loopback
and multicast (`ALWAYS_DENIED`). An entry "names" such a range when it lies inside it
(`10.1.2.0/24` opens that /24; `0.0.0.0/0` opens only public addresses); a host name
never does, whatever it resolves to. The host
itself and other sandboxes are never reachable. An empty list allows every public
destination; a non-empty list allows only its entries.

`compile_rules` turns entries into an ordered `EgressRules`; an enforcer applies it to
one sandbox link and counts what it drops: `tartarus.network.ebpf` (a tc classifier,
the default where it loads) or `tartarus.network.nftables` (the fallback).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from enum import StrEnum
from typing import Final, Protocol

import msgspec

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALWAYS_DENIED: Final = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "fd00:ec2::254/128",
        "ff00::/8",
    )
)

_PORTS = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_HOST = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


class EgressError(ValueError):
    """An egress entry that is not an address, CIDR or host name (with optional ports)."""


class PortRange(msgspec.Struct, frozen=True):
    first: int
    last: int


class Destination(msgspec.Struct, frozen=True, kw_only=True):
    """One parsed entry: a network or a host name, and optional ports."""

    network: str | None = None
    host: str | None = None
    ports: PortRange | None = None


class Verdict(StrEnum):
    ACCEPT = "accept"
    DROP = "drop"


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """Matches packets to `network` (and `ports`, when set); first match wins."""

    network: str
    ports: PortRange | None = None
    verdict: Verdict


class NameRule(msgspec.Struct, frozen=True, kw_only=True):
    """Allows what the sandbox's resolver answers for `pattern` (on `ports`)."""

    pattern: str
    ports: PortRange | None = None


class EgressRules(msgspec.Struct, frozen=True, kw_only=True):
    """The ordered rules for one sandbox; then the addresses resolved for `names` (their
    index in this list names them to the enforcer); packets nothing matches get
    `otherwise`."""

    rules: list[Rule]
    otherwise: Verdict
    names: list[NameRule] = msgspec.field(default_factory=list)
    # Whether the sandbox's resolver answers every name (the list was empty).
    any_name: bool = False


class LinkAddresses(msgspec.Struct, frozen=True, kw_only=True):
    """What an enforcer needs to know about one sandbox's link."""

    sandbox_id: str
    # The host end's interface name: packets the sandbox sends arrive on it.
    host_if: str
    # The only source address the sandbox may use.
    sandbox_address: str
    # The host end's address when the sandbox's resolver listens there (UDP 53): the
    # one port on the host the sandbox may reach.
    resolver: str | None = None


class Drops(msgspec.Struct, frozen=True, kw_only=True):
    """Packets an enforcer dropped for one sandbox since its link was made."""

    # To destinations its policy does not allow (the host included).
    denied: int = 0
    # With a source address that is not the sandbox's.
    spoofed: int = 0


class EgressEnforcer(Protocol):
    """Applies `EgressRules` to sandbox links in the kernel and counts drops. Traffic to
    the host itself and to other sandboxes is dropped by every enforcer, as are packets
    whose source is not the link's sandbox address."""

    async def attach(self, link: LinkAddresses, rules: EgressRules) -> None:
        """Installs the rules before the link carries traffic (replacing earlier ones)."""
        ...

    async def detach(self, host_if: str) -> None:
        """Removes the link's rules and counters; a missing link is not an error."""
        ...

    async def allow_resolved(
        self, host_if: str, name: int, records: list[tuple[str, int]], ports: PortRange | None
    ) -> None:
        """Allows the (address, ttl) pairs the resolver answered for `rules.names[name]`
        (whose ports are `ports`) until their TTL runs out (`resolved_allowed` says which
        and for how long)."""
        ...

    async def drops(self) -> dict[str, Drops]:
        """Drop counts by host interface, for every attached link."""
        ...

    async def attached(self) -> set[str]:
        """Host interfaces that have rules (to reap those whose link is gone)."""
        ...


# Resolved addresses stay allowed at least this long (a TTL of 0 still lets the
# connection that follows the lookup through), and at most a day.
MIN_TTL_S: Final = 30
MAX_TTL_S: Final = 86400


def resolved_allowed(
    records: list[tuple[str, int]], pools: list[ipaddress.IPv4Network]
) -> list[tuple[ipaddress.IPv4Address, int]]:
    """The resolver's (address, ttl) answers an enforcer lets through, TTLs clamped: never
    into the always-denied ranges or the sandbox pools, whatever a name resolves to."""
    allowed = []
    for address, ttl in records:
        ip = ipaddress.IPv4Address(address)
        if any(ip in n for n in (*ALWAYS_DENIED, *pools) if n.version == 4):
            continue
        allowed.append((ip, min(max(ttl, MIN_TTL_S), MAX_TTL_S)))
    return allowed


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise EgressError(f"{text!r} is not an address or CIDR") from e


def _ports(text: str, entry: str) -> PortRange:
    m = _PORTS.match(text)
    if m is None:
        raise EgressError(f"{entry!r}: {text!r} is not a port or a range like 8000-8100")
    first = int(m.group(1))
    last = int(m.group(2) or first)
    if not 1 <= first <= last <= 65535:
        raise EgressError(f"{entry!r}: ports must be 1-65535, first <= last")
    return PortRange(first, last)


def parse_entry(entry: str) -> Destination:
    """One policy entry (see the module docstring)."""
    text = entry.strip()
    ports: PortRange | None = None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise EgressError(f"{entry!r}: expected [ADDRESS/PREFIX]:PORT")
        text = inner
        if rest:
            ports = _ports(rest[1:], entry)
        return Destination(network=str(_network(text)), ports=ports)
    if text.count(":") == 1:
        text, port_text = text.split(":")
        ports = _ports(port_text, entry)
    try:
        return Destination(network=str(ipaddress.ip_network(text, strict=False)), ports=ports)
    except ValueError:
        pass
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    # A name's last label is not all digits (`10.0.0.300` is a bad address, not a name).
    if "/" in name or not _HOST.match(name) or name.rstrip(".").rsplit(".", 1)[-1].isdigit():
        raise EgressError(f"{entry!r} is not an address, CIDR or host name")
    return Destination(host=("*." if wildcard else "") + name.lower().rstrip("."), ports=ports)


def validate(entries: list[str]) -> None:
    """Raises `EgressError` naming the first bad entry."""
    for entry in entries:
        parse_entry(entry)


def _names_denied(network: IPNetwork) -> bool:
    return any(
        network.version == denied.version and network.subnet_of(denied)  # type: ignore[arg-type]
        for denied in ALWAYS_DENIED
    )


def resolve_host(host: str) -> list[IPNetwork]:
    """The host's addresses now (blocking); none if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return sorted(
        {ipaddress.ip_network(info[4][0]) for info in infos},
        key=lambda n: (n.version, int(n.network_address)),
    )


def compile_rules(entries: list[str], *, resolve: bool = True) -> EgressRules:
    """Ordered rules for `entries` (blocking when host names must be resolved).

    Entries inside an always-denied range come first (they name it); then the denied
    ranges; then the other entries; then the default: accept for an empty list, drop
    otherwise. Host names that do not resolve (or `resolve=False`) allow nothing.
    """
    named: list[Rule] = []
    wide: list[Rule] = []
    names: list[NameRule] = []
    for entry in entries:
        dest = parse_entry(entry)
        if dest.host is not None:
            names.append(NameRule(pattern=dest.host, ports=dest.ports))
        if dest.network is not None:
            networks = [ipaddress.ip_network(dest.network)]
        elif dest.host is not None and resolve and not dest.host.startswith("*."):
            networks = resolve_host(dest.host)
        else:
            networks = []
        for network in networks:
            rule = Rule(network=str(network), ports=dest.ports, verdict=Verdict.ACCEPT)
            # Only a written CIDR opens a denied range: a name that resolves into one
            # (DNS is not the policy's author) stays denied.
            opens = dest.network is not None and _names_denied(network)
            (named if opens else wide).append(rule)
    denied = [Rule(network=str(n), verdict=Verdict.DROP) for n in ALWAYS_DENIED]
    return EgressRules(
        rules=[*named, *denied, *wide],
        otherwise=Verdict.DROP if entries else Verdict.ACCEPT,
        names=names,
        any_name=not entries,
    )
