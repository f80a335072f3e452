"""The sandboxes' resolver: a DNS forwarder the host controls, one UDP endpoint per
sandbox link on the host end's address (port 53), which the sandbox's
`/etc/resolv.conf` names.

A query for a name the sandbox's egress list allows (or any name, when the list is
empty) goes to the upstream resolver (`[network] dns_upstream`, else the host's first
`nameserver`) and its answer back; the IPv4 addresses in the answer are handed to the
enforcer first, so the connection that follows the lookup is allowed, for the answer's
TTL. Any other name gets REFUSED, so a sandbox with an allow-list of names learns no
address beyond it, and the only resolver it can reach is this one (it is on the host,
whose every other port stays closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, cast

import anyio

log = logging.getLogger(__name__)

DNS_PORT: Final = 53
UPSTREAM_TIMEOUT_S: Final = 3.0
_HEADER: Final = struct.Struct("!HHHHHH")
_TYPE_A: Final = 1
_CLASS_IN: Final = 1
_RCODE_REFUSED: Final = 5
_MAX_NAME_JUMPS: Final = 32

# Called with the index of the egress entry that allowed the name and the answer's
# (address, ttl) pairs, before the answer goes back to the sandbox.
OnResolved = Callable[[int, list[tuple[str, int]]], Awaitable[None]]


class DnsFormatError(ValueError):
    pass


def _name(packet: bytes, offset: int) -> tuple[str, int]:
    """The (decompressed) name at `offset` and the offset just past it."""
    labels: list[str] = []
    end: int | None = None
    for _ in range(_MAX_NAME_JUMPS):
        if offset >= len(packet):
            raise DnsFormatError("name runs past the packet")
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(packet):
                raise DnsFormatError("truncated pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | packet[offset + 1]
            continue
        if length == 0:
            return ".".join(labels).lower(), end if end is not None else offset + 1
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise DnsFormatError("too many compression pointers")


def question(packet: bytes) -> tuple[str, int, int]:
    """(name, qtype, offset past the question) of a one-question query."""
    if len(packet) < _HEADER.size:
        raise DnsFormatError("shorter than a header")
    _, _, qdcount, _, _, _ = _HEADER.unpack_from(packet)
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions")
    name, offset = _name(packet, _HEADER.size)
    if offset + 4 > len(packet):
        raise DnsFormatError("truncated question")
    qtype, _ = struct.unpack_from("!HH", packet, offset)
    return name, qtype, offset + 4


def refused(query: bytes) -> bytes:
    """A REFUSED answer to `query` (its question echoed, no records)."""
    ident, flags, *_ = _HEADER.unpack_from(query)
    _, _, end = question(query)
    # QR=1, the query's opcode and RD, RA=1, RCODE=REFUSED.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0080 | _RCODE_REFUSED
    return _HEADER.pack(ident, out_flags, 1, 0, 0, 0) + query[_HEADER.size : end]


def a_records(answer: bytes) -> list[tuple[str, int]]:
    """The (IPv4 address, ttl) of every A record in an answer's answer section."""
    _, _, qdcount, ancount, _, _ = _HEADER.unpack_from(answer)
    offset = _HEADER.size
    for _ in range(qdcount):
        _, offset = _name(answer, offset)
        offset += 4
    out: list[tuple[str, int]] = []
    for _ in range(ancount):
        _, offset = _name(answer, offset)
        if offset + 10 > len(answer):
            raise DnsFormatError("truncated record")
        rtype, rclass, ttl, length = struct.unpack_from("!HHIH", answer, offset)
        offset += 10
        data = answer[offset : offset + length]
        offset += length
        if rtype == _TYPE_A and rclass == _CLASS_IN and len(data) == 4:
            out.append((str(ipaddress.IPv4Address(data)), ttl))
    return out


def host_upstream(resolv_conf: Path = Path("/etc/resolv.conf")) -> str | None:
    """The host's first IPv4 `nameserver`, if any."""
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    return str(ipaddress.IPv4Address(parts[1]))
    return None


def matches(pattern: str, name: str) -> bool:
    """`pattern` is a name (`pypi.org`) or a wildcard for its subdomains
    (`*.pythonhosted.org`, which does not match `pythonhosted.org` itself)."""
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, gate: DnsGate) -> None:
        self.gate = gate
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram endpoint's transport (uvloop's is not a DatagramTransport subclass).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        task = asyncio.ensure_future(self.gate.answer(self, data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class DnsGate:
    """The resolver of one sandbox link. `names`: the host-name patterns of its egress
    list, in entry order (None: every name is allowed, the list being empty)."""

    def __init__(
        self,
        address: str,
        upstream: str,
        names: list[tuple[int, str]] | None,
        on_resolved: OnResolved,
    ) -> None:
        self.address = address
        self.upstream = upstream
        self.names = names
        self.on_resolved = on_resolved
        self._endpoint: _Endpoint | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), local_addr=(self.address, DNS_PORT)
        )
        self._endpoint = endpoint

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            for task in endpoint.tasks:
                task.cancel()
            if endpoint.transport is not None:
                endpoint.transport.close()

    def allowed_by(self, name: str) -> int | None:
        """The index of the first entry that allows `name` (-1: every name is)."""
        if self.names is None:
            return -1
        return next((i for i, pattern in self.names if matches(pattern, name)), None)

    async def answer(self, endpoint: _Endpoint, query: bytes, addr: tuple[str | int, int]) -> None:
        try:
            name, _, _ = question(query)
        except DnsFormatError:
            return
        entry = self.allowed_by(name)
        try:
            reply = refused(query) if entry is None else await self._forward(query, entry)
        except (OSError, TimeoutError, DnsFormatError, anyio.EndOfStream) as e:
            log.debug("resolving %s for %s failed: %s", name, self.address, e)
            return
        if endpoint.transport is not None and not endpoint.transport.is_closing():
            endpoint.transport.sendto(reply, addr)

    async def _forward(self, query: bytes, entry: int) -> bytes:
        async with await anyio.create_connected_udp_socket(self.upstream, DNS_PORT) as udp:
            await udp.send(query)
            with anyio.fail_after(UPSTREAM_TIMEOUT_S):
                while True:
                    reply = await udp.receive()
                    if reply[:2] == query[:2]:
                        break
        if entry >= 0:
            records = a_records(reply)
            if records:
                await self.on_resolved(entry, records)
        return reply
