"""The sandboxes' resolver: a DNS forwarder the host controls, one UDP endpoint and one
TCP listener per sandbox link on the host end's address (port 53), which the sandbox's
`/etc/resolv.conf` names. TCP is what a client retries on when a UDP answer comes back
truncated (more than 512 bytes: many records, long names); a query that came over TCP
goes upstream over TCP too. TCP clients are bounded: a few connections per sandbox, a
few queries each, an idle timeout.

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
from anyio.streams.buffered import BufferedByteReceiveStream

log = logging.getLogger(__name__)

DNS_PORT: Final = 53
UPSTREAM_TIMEOUT_S: Final = 3.0
# Per sandbox: TCP connections at once, queries on one, and seconds a connection may sit
# without sending a whole query.
TCP_CLIENTS: Final = 8
TCP_QUERIES: Final = 32
TCP_IDLE_S: Final = 10.0
_HEADER: Final = struct.Struct("!HHHHHH")
_LENGTH: Final = struct.Struct("!H")
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
    if len(answer) < _HEADER.size:
        raise DnsFormatError("shorter than a header")
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
        *,
        port: int = DNS_PORT,
        upstream_port: int = DNS_PORT,
        tcp_idle_s: float = TCP_IDLE_S,
    ) -> None:
        self.address = address
        self.upstream = upstream
        self.names = names
        self.on_resolved = on_resolved
        # Where it listens and where the upstream does (tests use other ports).
        self.port = port
        self.upstream_port = upstream_port
        self.tcp_idle_s = tcp_idle_s
        self._endpoint: _Endpoint | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_clients: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: _Endpoint(self), local_addr=(self.address, self.port)
        )
        self._endpoint = endpoint
        try:
            self._tcp = await asyncio.start_server(self._serve_tcp, self.address, self.port)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is not None:
            for task in endpoint.tasks:
                task.cancel()
            if endpoint.transport is not None:
                endpoint.transport.close()
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.close()
        for writer in list(self._tcp_clients):
            writer.close()

    def allowed_by(self, name: str) -> int | None:
        """The index of the first entry that allows `name` (-1: every name is)."""
        if self.names is None:
            return -1
        return next((i for i, pattern in self.names if matches(pattern, name)), None)

    async def answer(self, endpoint: _Endpoint, query: bytes, addr: tuple[str | int, int]) -> None:
        reply = await self.reply(query, tcp=False)
        transport = endpoint.transport
        if reply is not None and transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    async def reply(self, query: bytes, *, tcp: bool) -> bytes | None:
        """The answer to `query`: REFUSED for a name not allowed, else the upstream's
        (over TCP when `tcp`); None for a malformed query or an upstream that failed."""
        try:
            name, _, _ = question(query)
        except DnsFormatError:
            return None
        entry = self.allowed_by(name)
        try:
            return refused(query) if entry is None else await self._forward(query, entry, tcp)
        except (
            OSError,
            TimeoutError,
            DnsFormatError,
            anyio.EndOfStream,
            anyio.IncompleteRead,
        ) as e:
            log.debug("resolving %s for %s failed: %s", name, self.address, e)
            return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients.add(writer)
        try:
            for _ in range(TCP_QUERIES):
                async with asyncio.timeout(self.tcp_idle_s):
                    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                    query = await reader.readexactly(length)
                reply = await self.reply(query, tcp=True)
                if reply is None:
                    break
                writer.write(_LENGTH.pack(len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            writer.close()

    async def _forward(self, query: bytes, entry: int, tcp: bool) -> bytes:
        reply = await (self._ask_tcp(query) if tcp else self._ask_udp(query))
        if entry >= 0:
            records = a_records(reply)
            if records:
                await self.on_resolved(entry, records)
        return reply

    async def _ask_udp(self, query: bytes) -> bytes:
        udp = await anyio.create_connected_udp_socket(self.upstream, self.upstream_port)
        async with udp:
            await udp.send(query)
            with anyio.fail_after(UPSTREAM_TIMEOUT_S):
                while True:
                    reply = await udp.receive()
                    if reply[:2] == query[:2]:
                        return reply

    async def _ask_tcp(self, query: bytes) -> bytes:
        with anyio.fail_after(UPSTREAM_TIMEOUT_S):
            async with await anyio.connect_tcp(self.upstream, self.upstream_port) as stream:
                await stream.send(_LENGTH.pack(len(query)) + query)
                buffered = BufferedByteReceiveStream(stream)
                (length,) = _LENGTH.unpack(await buffered.receive_exactly(_LENGTH.size))
                reply = await buffered.receive_exactly(length)
        # One query per connection, so the answer must be to it (UDP skips strays instead).
        if reply[:2] != query[:2]:
            raise DnsFormatError("the upstream answered another query")
        return reply
