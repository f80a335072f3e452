"""The sandboxes' resolver (`tartarus.network.dns.DnsGate`) on real sockets, with a real
dnsmasq as its upstream, on loopback: an answer too big for UDP comes back truncated
and whole over TCP, names outside the allow-list are refused on both, and hostile TCP
clients (garbage, silence, too many connections) are cut off without harm to the next.
The parsers take any bytes (Hypothesis) and fail only with `DnsFormatError`."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import given
from hypothesis import strategies as st

from tartarus.network.dns import TCP_CLIENTS, DnsFormatError, DnsGate, a_records, question
from tests.conftest import require_binary
from tests.support.registry import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

MANY = 40  # A records of many.big.test: more than a 512-byte UDP answer holds
_RCODE_REFUSED = 5
_TC = 0x0200


def query(name: str, ident: int = 0x4242) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def flags(reply: bytes) -> int:
    return int(struct.unpack_from("!H", reply, 2)[0])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def dnsmasq() -> Iterator[tuple[str, int]]:
    """dnsmasq on a loopback address of its own: allowed.test has one address,
    many.big.test has MANY, and it knows nothing else (no upstream of its own)."""
    binary = require_binary("dnsmasq")
    address, port = f"127.53.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}", free_port()
    records = [f"--host-record=many.big.test,203.0.113.{i}" for i in range(1, MANY + 1)]
    argv = [binary, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts"]
    argv += [f"--listen-address={address}", "--bind-interfaces", f"--port={port}", "--pid-file="]
    argv += ["--address=/allowed.test/203.0.113.7", *records]
    # As root it would drop to `nobody`; it needs nothing of root's after binding.
    argv += ["--user=root"] if os.geteuid() == 0 else []
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_udp(address, port, process)
        yield address, port
    finally:
        process.terminate()
        process.wait()


def _wait_for_udp(address: str, port: int, process: subprocess.Popen[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        for _ in range(50):
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"dnsmasq exited: {process.stderr.read().decode(errors='replace')}")
            s.sendto(query("allowed.test"), (address, port))
            with contextlib.suppress(TimeoutError):
                s.recv(512)
                return
    pytest.fail("dnsmasq did not answer")


class Resolved:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[tuple[str, int]]]] = []

    async def __call__(self, entry: int, records: list[tuple[str, int]]) -> None:
        self.calls.append((entry, records))


@contextlib.asynccontextmanager
async def gate_for(
    upstream: tuple[str, int], resolved: Resolved, **kw: float
) -> AsyncIterator[DnsGate]:
    gate = DnsGate(
        "127.0.0.1",
        upstream[0],
        [(0, "allowed.test"), (1, "*.big.test")],
        resolved,
        port=free_port(),
        upstream_port=upstream[1],
        **kw,
    )
    await gate.open()
    try:
        yield gate
    finally:
        gate.close()


async def ask_udp(gate: DnsGate, message: bytes) -> bytes:
    async with await anyio.create_connected_udp_socket(gate.address, gate.port) as udp:
        await udp.send(message)
        with anyio.fail_after(5):
            return await udp.receive()


async def ask_tcp(stream: anyio.abc.ByteStream, message: bytes) -> bytes:
    buffered = BufferedByteReceiveStream(stream)
    await stream.send(struct.pack("!H", len(message)) + message)
    with anyio.fail_after(5):
        (length,) = struct.unpack("!H", await buffered.receive_exactly(2))
        return await buffered.receive_exactly(length)


async def closed_by_peer(stream: anyio.abc.ByteStream, within_s: float = 5) -> bool:
    with anyio.fail_after(within_s):
        try:
            return await stream.receive() == b""
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError):
            return True


async def test_an_answer_too_big_for_udp_comes_whole_over_tcp(
    dnsmasq: tuple[str, int],
) -> None:
    resolved = Resolved()
    async with gate_for(dnsmasq, resolved) as gate:
        over_udp = await ask_udp(gate, query("many.big.test"))
        assert flags(over_udp) & _TC, "dnsmasq truncates: the client must retry over TCP"
        async with await anyio.connect_tcp(gate.address, gate.port) as tcp:
            over_tcp = await ask_tcp(tcp, query("many.big.test", ident=7))
            # Several queries on one connection, answered in order.
            one = await ask_tcp(tcp, query("allowed.test", ident=8))
        assert over_tcp[:2] == b"\0\7" and not flags(over_tcp) & _TC
        assert len(a_records(over_tcp)) == MANY
        assert [a for a, _ in a_records(one)] == ["203.0.113.7"]
    # What the sandbox learnt over TCP is what its egress rules are given.
    tcp_call = next(records for entry, records in resolved.calls if len(records) == MANY)
    assert {a for a, _ in tcp_call} == {f"203.0.113.{i}" for i in range(1, MANY + 1)}
    assert [(e, [a for a, _ in r]) for e, r in resolved.calls if e == 0] == [(0, ["203.0.113.7"])]


async def test_names_outside_the_list_are_refused_on_tcp_too(dnsmasq: tuple[str, int]) -> None:
    resolved = Resolved()
    async with (
        gate_for(dnsmasq, resolved) as gate,
        await anyio.connect_tcp(gate.address, gate.port) as tcp,
    ):
        for name in ("denied.test", "big.test"):
            reply = await ask_tcp(tcp, query(name))
            assert flags(reply) & 0x000F == _RCODE_REFUSED, name
            assert a_records(reply) == []
    assert resolved.calls == []


async def test_hostile_tcp_clients_are_cut_off_and_the_next_is_served(
    dnsmasq: tuple[str, int],
) -> None:
    async with gate_for(dnsmasq, Resolved(), tcp_idle_s=0.5) as gate:
        # Garbage of the announced length: not a query, the connection ends.
        async with await anyio.connect_tcp(gate.address, gate.port) as tcp:
            await tcp.send(struct.pack("!H", 5) + b"\xff" * 5)
            assert await closed_by_peer(tcp)
        # Half a length, then silence: cut off after the idle timeout.
        async with await anyio.connect_tcp(gate.address, gate.port) as tcp:
            await tcp.send(b"\x00")
            assert await closed_by_peer(tcp, within_s=5)
        # A length longer than what follows, then the client leaves: nothing breaks.
        async with await anyio.connect_tcp(gate.address, gate.port) as tcp:
            await tcp.send(struct.pack("!H", 4000) + b"x" * 10)
        # More connections than a sandbox may hold: the extra one is closed at once.
        async with contextlib.AsyncExitStack() as stack:
            held = [
                await stack.enter_async_context(await anyio.connect_tcp(gate.address, gate.port))
                for _ in range(TCP_CLIENTS)
            ]
            await anyio.sleep(0.1)
            async with await anyio.connect_tcp(gate.address, gate.port) as extra:
                assert await closed_by_peer(extra)
            # The held ones still work.
            assert a_records(await ask_tcp(held[0], query("allowed.test")))
        # And afterwards a well-behaved client is answered.
        async with await anyio.connect_tcp(gate.address, gate.port) as tcp:
            assert a_records(await ask_tcp(tcp, query("allowed.test")))


async def test_an_upstream_that_is_gone_gets_no_answer_and_no_crash() -> None:
    gone = ("127.0.0.1", free_port())  # nothing listens there
    async with (
        gate_for(gone, Resolved()) as gate,
        await anyio.connect_tcp(gate.address, gate.port) as tcp,
    ):
        message = query("allowed.test")
        await tcp.send(struct.pack("!H", len(message)) + message)
        assert await closed_by_peer(tcp)
        # Still listening, and answering what needs no upstream.
        async with await anyio.connect_tcp(gate.address, gate.port) as again:
            assert flags(await ask_tcp(again, query("denied.test"))) & 0xF == _RCODE_REFUSED


@given(st.binary(max_size=700))
def test_the_parsers_take_any_bytes(data: bytes) -> None:
    for parse in (question, a_records):
        with contextlib.suppress(DnsFormatError):
            parse(data)
