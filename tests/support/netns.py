"""Network namespaces for fleet tests (iproute2, as root): a bridge on the host and one
namespace per node, each joined to the bridge by a veth pair, in a private /24 picked
at random and checked unused. Names carry a random tag, so parallel runs do not collide;
everything is deleted when the block ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Namespace:
    name: str
    address: str
    veth: str  # the namespace's end

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def cut(self) -> None:
        """Cuts the node's network (its link goes down)."""
        _ip("netns", "exec", self.name, "ip", "link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("netns", "exec", self.name, "ip", "link", "set", self.veth, "up")


@dataclass
class Network:
    bridge: str
    host_address: str
    namespaces: list[Namespace] = field(default_factory=list)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (euid {os.geteuid()})"
    if shutil.which("ip") is None:
        return "iproute2's ip is not on PATH (make installs it)"
    probe = f"tfprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _free_subnet() -> str:
    used = subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout
    for _ in range(100):
        subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}"  # noqa: S311
        if f" {subnet}." not in used:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet for the test network")


@contextlib.contextmanager
def network(count: int) -> Iterator[Network]:
    """A bridge with the host at .1 and `count` namespaces at .11, .12, ..."""
    tag = secrets.token_hex(2)
    subnet = _free_subnet()
    net = Network(bridge=f"tfb{tag}", host_address=f"{subnet}.1")
    made_ns: list[str] = []
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.host_address}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for i in range(count):
            name = f"tfn{tag}-{i}"
            host_end, ns_end = f"tfv{tag}{i}h", f"tfv{tag}{i}n"
            _ip("netns", "add", name)
            made_ns.append(name)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", host_end, "master", net.bridge, "up")
            _ip("link", "set", ns_end, "netns", name)
            address = f"{subnet}.{11 + i}"
            _ip("netns", "exec", name, "ip", "addr", "add", f"{address}/24", "dev", ns_end)
            _ip("netns", "exec", name, "ip", "link", "set", ns_end, "up")
            _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
            net.namespaces.append(Namespace(name=name, address=address, veth=ns_end))
        yield net
    finally:
        for name in made_ns:
            # Deleting a namespace deletes its end of the veth, and so the pair.
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", net.bridge], capture_output=True, check=False)
