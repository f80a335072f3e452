"""Type stubs for the Rust extension `tartarus._core`."""

from os import PathLike
from typing import Any

__version__: str

def probe_host(disk_path: str | PathLike[str]) -> dict[str, Any]: ...
def make_netns(directory: str | PathLike[str], name: str) -> None: ...
def remove_netns(directory: str | PathLike[str], name: str) -> bool: ...
def add_veth(
    host_if: str, peer_if: str, netns: str | PathLike[str], host_address: str, prefix_len: int
) -> None: ...
def link_up(name: str) -> None: ...
def delete_link(name: str) -> bool: ...
def configure_inside(
    netns: str | PathLike[str], ifname: str, address: str, prefix_len: int, gateway: str
) -> None: ...
def egress_probe(pin_dir: str | PathLike[str]) -> None: ...
def egress_attach(
    pin_dir: str | PathLike[str],
    host_if: str,
    sandbox_address: str,
    resolver: str | None,
    accept_otherwise: bool,
    rules: list[tuple[str, int, list[tuple[int, int, bool]]]],
) -> None: ...
def egress_allow_resolved(
    pin_dir: str | PathLike[str], host_if: str, address: str, first: int, last: int, ttl_s: float
) -> None: ...
def egress_detach(pin_dir: str | PathLike[str], host_if: str) -> bool: ...
def egress_links(pin_dir: str | PathLike[str]) -> list[tuple[str, int, int, int]]: ...
def inspect_snapshot(path: str | PathLike[str], verify_memory: bool = False) -> dict[str, Any]:
    """Checks a microVM snapshot file and returns its header and state summary."""
    ...

class SnapshotError(Exception):
    """A microVM snapshot file is unusable or unreadable; the message says why."""

class VmmError(Exception):
    """A tartarus-vmm request failed. `args` is `(kind, message)`: `kind` is `connect`,
    `io`, `decode`, or the API's error kind (`bad_request`, `invalid_state`, `config`,
    `boot`, `internal`)."""

class VmmClient:
    """Blocking client for one `tartarus-vmm` control socket (GIL released while waiting)."""

    def __init__(self, socket_path: str | PathLike[str], timeout_s: float = 30.0) -> None: ...
    def request(self, request: str) -> dict[str, Any]:
        """Sends one JSON request (an object with an `op`) and returns its result."""
        ...
