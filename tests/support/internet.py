"""A small test "internet" for the network suites and the network bench: a network
namespace joined to the host by a veth pair the host routes (198.18.0.0/15, the
benchmarking range, so nothing real answers), running TCP servers on a public-looking
address, on the metadata address 169.254.169.254 and on a private address (host routes
send those two there too, so only the sandbox rules keep them out of reach), and a DNS
server that answers every A query with the server's address."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from tartarus.network.namespaces import NETNS_DIR

METADATA = "169.254.169.254"
BULK_BYTES = 2 << 20
# Greets on every port but the last two: the second to last sends BULK_BYTES, the last
# reads to the end and answers how many bytes came.
SERVER_SCRIPT = f"""
import socket, sys, threading
ports = [int(p) for p in sys.argv[1:]]
def serve(listener, port):
    while True:
        conn, _ = listener.accept()
        with conn:
            if port == ports[-2]:
                conn.sendall(bytes({BULK_BYTES}))
            elif port == ports[-1]:
                got = 0
                while data := conn.recv(65536):
                    got += len(data)
                conn.sendall(b"%d\\n" % got)
            else:
                conn.sendall(b"hello %d\\n" % port)
for port in ports:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    threading.Thread(target=serve, args=(listener, port), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


# A resolver for the test's internet: every A query gets the server's address.
DNS_SCRIPT = """
import socket, struct, sys
answer_ip = socket.inet_aton(sys.argv[1])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", 53))
print("ready", flush=True)
while True:
    query, peer = sock.recvfrom(512)
    end = 12
    while query[end]:
        end += 1 + query[end]
    qtype = struct.unpack("!H", query[end + 1 : end + 3])[0]
    question = query[12 : end + 5]
    records = b""
    if qtype == 1:
        records = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + answer_ip
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if records else 0, 0, 0)
    sock.sendto(header + question + records, peer)
"""


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Internet:
    netns: str
    host_if: str
    # The server's public-looking address, and a private one routed to it.
    address: str
    private: str
    ports: tuple[int, int]
    bulk_port: int
    sink_port: int


@contextlib.contextmanager
def built_internet() -> Iterator[Internet]:
    """Builds the internet (as root), yields it, and removes every part of it."""
    tag = f"{os.getpid() % 10000:04d}{secrets.randbelow(100):02d}"
    octet, quad = secrets.randbelow(256), secrets.randbelow(64) * 4
    inet = Internet(
        netns=f"ttt-inet-{tag}",
        host_if=f"tti{tag}",
        address=f"198.19.{octet}.{quad + 2}",
        private=f"172.31.{octet}.{quad + 2}",
        ports=(18000 + secrets.randbelow(1000), 19000 + secrets.randbelow(1000)),
        bulk_port=20000 + secrets.randbelow(1000),
        sink_port=21000 + secrets.randbelow(1000),
    )
    host_side = f"198.19.{octet}.{quad + 1}"
    metric = str(1000 + secrets.randbelow(60000))
    run("ip", "netns", "add", inet.netns)
    server: subprocess.Popen[str] | None = None
    resolver: subprocess.Popen[str] | None = None
    try:
        run("ip", "link", "add", inet.host_if, "type", "veth", "peer", "name", "eth0",
            "netns", inet.netns)  # fmt: skip
        run("ip", "addr", "add", f"{host_side}/30", "dev", inet.host_if)
        run("ip", "link", "set", inet.host_if, "up")
        for args in (
            ["addr", "add", f"{inet.address}/30", "dev", "eth0"],
            ["addr", "add", f"{METADATA}/32", "dev", "lo"],
            ["addr", "add", f"{inet.private}/32", "dev", "lo"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
            ["route", "add", "default", "via", host_side],
        ):
            run("ip", "-n", inet.netns, *args)
        # Without the sandbox rules both would be reachable: the host routes them here.
        # A metric of its own: parallel test workers each add a route to METADATA.
        for dest in (METADATA, inet.private):
            run("ip", "route", "add", f"{dest}/32", "via", inet.address, "metric", metric)
        server = subprocess.Popen(
            [
                "nsenter",
                f"--net={NETNS_DIR / inet.netns}",
                sys.executable,
                "-c",
                SERVER_SCRIPT,
                *map(str, (*inet.ports, inet.bulk_port, inet.sink_port)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        resolver = subprocess.Popen(
            [
                "nsenter",
                f"--net={NETNS_DIR / inet.netns}",
                sys.executable,
                "-c",
                DNS_SCRIPT,
                inet.address,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert resolver.stdout is not None
        assert resolver.stdout.readline().strip() == "ready"
        yield inet
    finally:
        for process in (server, resolver):
            if process is not None:
                process.kill()
                process.wait()
        for dest in (METADATA, inet.private):
            subprocess.run(
                ["ip", "route", "del", f"{dest}/32", "via", inet.address, "metric", metric],
                check=False,
                capture_output=True,
            )
        subprocess.run(["ip", "link", "del", inet.host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", inet.netns], check=False, capture_output=True)
