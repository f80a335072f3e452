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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tartarus.snapshots.catalog import (
        PoolTarget,
        SnapshotCatalog,
        SnapshotPurpose,
        SnapshotRecord,
    )
    from tartarus.snapshots.service import SnapshotError, SnapshotNotFoundError, SnapshotService

# Where each re-exported name lives: loaded on first use (PEP 562), so importing one
# submodule (the API's bodies, the SDK) does not load the whole snapshot service.
_HOMES = {
    "PoolTarget": "catalog",
    "SnapshotCatalog": "catalog",
    "SnapshotPurpose": "catalog",
    "SnapshotRecord": "catalog",
    "SnapshotError": "service",
    "SnapshotNotFoundError": "service",
    "SnapshotService": "service",
}

__all__ = [
    "PoolTarget",
    "SnapshotCatalog",
    "SnapshotError",
    "SnapshotNotFoundError",
    "SnapshotPurpose",
    "SnapshotRecord",
    "SnapshotService",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
