"""The host-wide address pool: link `n` of the pool is the /30 at offset `4n`, and it is
taken by creating the lease file `<leases_dir>/<n>` exclusively (atomic, so servers
and test workers sharing the host never take one link twice). The file holds the
lease (who took it), so a reconcile knows what to remove.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from tartarus.errors import UnavailableError

LINK_PREFIX_LEN: Final = 30


class PoolExhaustedError(UnavailableError):
    """Every link of the pool is leased (the host cannot network another sandbox now)."""

    slug = "network-pool-exhausted"


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    # Whose it is: the owning runtime's scope and its sandbox.
    scope: str
    sandbox_id: str
    netns: str
    host_if: str
    host_address: str
    sandbox_address: str


class Pool:
    def __init__(self, network: ipaddress.IPv4Network, leases_dir: Path) -> None:
        self.network = network
        self.dir = leases_dir
        self.size = network.num_addresses // 4

    def addresses(self, index: int) -> tuple[str, str]:
        """(host end, sandbox end) of link `index`."""
        base = int(self.network.network_address) + 4 * index
        return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))

    def take(self, scope: str, sandbox_id: str, netns: str, host_if_prefix: str) -> Lease:
        """Leases the first free link (blocking: file creation)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for index in range(self.size):
            path = self.dir / str(index)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            host, sandbox = self.addresses(index)
            lease = Lease(
                index=index,
                scope=scope,
                sandbox_id=sandbox_id,
                netns=netns,
                host_if=f"{host_if_prefix}{index}",
                host_address=host,
                sandbox_address=sandbox,
            )
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.encode(lease))
            return lease
        raise PoolExhaustedError(f"all {self.size} sandbox links of {self.network} are in use")

    def give_back(self, lease: Lease) -> None:
        """Removes the lease file if it still holds `lease`: a reap may have given it
        back already and another sandbox taken the link since."""
        path = self.dir / str(lease.index)
        with contextlib.suppress(OSError, msgspec.DecodeError):
            if msgspec.json.decode(path.read_bytes(), type=Lease) == lease:
                path.unlink()

    def aged(self, lease: Lease, older_than_s: float) -> bool:
        """True if the lease file is older than `older_than_s`."""
        try:
            mtime = (self.dir / str(lease.index)).stat().st_mtime
        except OSError:
            return False
        return time.time() - mtime > older_than_s

    def drop_unwritten(self, older_than_s: float) -> list[int]:
        """Removes lease files that hold no lease and are older than `older_than_s` (a
        process died between creating one and writing it); returns their indexes."""
        dropped: list[int] = []
        if not self.dir.is_dir():
            return dropped
        now = time.time()
        for path in self.dir.iterdir():
            with contextlib.suppress(OSError):
                if path.name.isdigit() and now - path.stat().st_mtime > older_than_s:
                    try:
                        msgspec.json.decode(path.read_bytes(), type=Lease)
                    except msgspec.DecodeError:
                        path.unlink()
                        dropped.append(int(path.name))
        return dropped

    def leases(self) -> Iterator[Lease]:
        """Every lease on the host (unreadable ones, being written, are skipped)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            if not path.name.isdigit():
                continue
            with contextlib.suppress(OSError, msgspec.DecodeError):
                yield msgspec.json.decode(path.read_bytes(), type=Lease)
