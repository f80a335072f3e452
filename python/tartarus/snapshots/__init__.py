"""Nyx: snapshots, restores, forks and warm pools.

Nyx saves a running sandbox whole (memory, processes, files) and brings copies of it
back: a microVM through `tartarus-vmm`'s snapshot format, a gVisor sandbox through
`runsc checkpoint`/`restore`. Snapshots are filed in the blob store (Erebus) and
recorded in the server's state database; warm pools keep restored sandboxes ready so
that a create is a hand-over.

- `catalog`: snapshot records and pool targets (SQLite);
- `service`: take, file, restore, delete, build a template's warm snapshot;
- `pools`: warm pools kept full in the background;
- `wiring`: the server's wiring (creates from snapshots, pool hits, fork,
  checkpoint-on-stop).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tartarus.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from tartarus.snapshots.catalog import (
        PoolTarget,
        SnapshotCatalog,
        SnapshotPurpose,
        SnapshotRecord,
    )
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

# Loaded on first use, so importing one submodule does not load the snapshot service.
__getattr__ = lazy_exports(
    __name__,
    {
        "PoolTarget": "catalog",
        "SnapshotCatalog": "catalog",
        "SnapshotPurpose": "catalog",
        "SnapshotRecord": "catalog",
        "SnapshotError": "service",
        "SnapshotNotFoundError": "service",
        "SnapshotService": "service",
    },
)
