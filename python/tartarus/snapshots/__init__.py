"""Nyx: snapshots, restores, forks and warm pools.

Nyx saves a running sandbox whole (memory, processes, files) and brings copies of it
back: a microVM through `tartarus-vmm`'s snapshot format, a gVisor sandbox through
`runsc checkpoint`/`restore`. Snapshots are filed in the blob store (Erebus) and
recorded in the server's state database; warm pools keep restored sandboxes ready so
that a create is a hand-over.

- `catalog`: snapshot records and pool targets (SQLite);
- `service`: take, file, restore, delete, build a template's warm snapshot;
- `pools`: warm pools kept full in the background;
- `nyx`: the server's wiring (creates from snapshots, pool hits, fork,
  checkpoint-on-stop).
"""

from tartarus.snapshots.catalog import PoolTarget, SnapshotCatalog, SnapshotPurpose, SnapshotRecord
from tartarus.snapshots.service import SnapshotError, SnapshotNotFoundError, SnapshotService

__all__ = [
    "PoolTarget",
    "SnapshotCatalog",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotPurpose",
    "SnapshotRecord",
    "SnapshotService",
]
