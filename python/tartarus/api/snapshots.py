"""Request and response bodies of the snapshot and warm-pool endpoints (Nyx)."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated

import msgspec
from msgspec import Meta

from tartarus.api.sandbox import Backend, Resources
from tartarus.api.types import (
    MAX_LIST_LIMIT,
    Cursor,
    MetadataMap,
    ResourcesBody,
    SandboxInfo,
    SnapshotId,
    TemplateName,
    TimeoutSeconds,
    _Request,
    _Response,
)

MAX_FORK = 50
MAX_POOL_SIZE = 64

Label = Annotated[str, Meta(max_length=256)]


class SnapshotPurpose(StrEnum):
    """Why a snapshot exists; it decides who may delete it and when."""

    # Asked for by a user (`sandbox.snapshot()`, `tartarus snapshot create`).
    USER = "user"
    # A template booted and warmed up: what warm pools restore from.
    TEMPLATE = "template"
    # Taken to fork a sandbox; removed once the clones exist (they hold its files).
    FORK = "fork"
    # Taken when a sandbox that asked for it was stopped.
    TERMINATE = "terminate"
    # A paused sandbox, as it was: resuming restores it under its own id. It goes with
    # the sandbox (resumed or deleted).
    PAUSE = "pause"


class SnapshotEntry(_Response, kw_only=True):
    id: SnapshotId
    backend: Backend
    template: str
    purpose: SnapshotPurpose
    created_at: dt.datetime
    size_bytes: int
    # An incremental snapshot applies on top of this one.
    parent: str | None = None
    source_sandbox: str | None = None
    label: str = ""
    resources: Resources
    network: bool
    metadata: dict[str, str]
    # The content digest of the snapshot's files in the blob store.
    blob: str


class SnapshotPage(_Response, kw_only=True):
    items: list[SnapshotEntry]
    next_cursor: str | None = None


class SnapshotSandboxBody(_Request, kw_only=True):
    """A snapshot of a running sandbox (it keeps running)."""

    label: Label = ""
    metadata: MetadataMap = msgspec.field(default_factory=dict)


class TemplateSnapshotBody(_Request, kw_only=True):
    """A template's warm snapshot: start it, run its warm-up script, snapshot it."""

    template: TemplateName
    backend: Backend = Backend.AUTO
    resources: ResourcesBody = msgspec.field(default_factory=ResourcesBody)
    label: Label = ""


class RestoreBody(_Request, kw_only=True, omit_defaults=True):
    """A sandbox restored from a snapshot."""

    # Unset: as for a create (docs/policy.md, "Defaults").
    timeout_s: TimeoutSeconds | None = None
    metadata: MetadataMap = msgspec.field(default_factory=dict)
    checkpoint_on_stop: bool = False


class ForkBody(_Request, kw_only=True):
    """`count` new sandboxes that start as copies of this one, as it is now."""

    count: Annotated[int, Meta(ge=1, le=MAX_FORK)] = 1
    # Seconds until the copies stop (default: the time the original has left).
    timeout_s: TimeoutSeconds | None = None
    metadata: MetadataMap = msgspec.field(default_factory=dict)


class ForkResult(_Response, kw_only=True):
    # The snapshot the copies were restored from (deleted once they exist).
    snapshot_id: str
    sandboxes: list[SandboxInfo]


class PruneQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which snapshots to delete: all conditions must hold.

    older_than_s: taken more than this many seconds ago
    keep: per template and purpose, keep this many newest
    template: only this template's
    purpose: only these purposes (repeat for several; default: user and terminate)
    dry_run: report what would go, delete nothing
    """

    older_than_s: Annotated[float, Meta(ge=0)] | None = None
    keep: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    template: TemplateName | None = None
    purpose: list[SnapshotPurpose] = msgspec.field(
        default_factory=lambda: [SnapshotPurpose.USER, SnapshotPurpose.TERMINATE]
    )
    dry_run: bool = False


class PruneReport(_Response, kw_only=True):
    removed: list[str]
    freed_bytes: int
    dry_run: bool


class SnapshotListQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Filters for listing snapshots.

    template: only this template's
    purpose: only these purposes (repeat for several)
    limit: page size
    cursor: next_cursor from the previous page
    """

    template: str | None = None
    purpose: list[SnapshotPurpose] = msgspec.field(default_factory=list)
    limit: Annotated[int, Meta(ge=1, le=MAX_LIST_LIMIT)] = 100
    cursor: Cursor | None = None


class PoolInfo(_Response, kw_only=True):
    template: str
    # Ready sandboxes wanted, and ready now.
    target: int
    ready: int
    backend: Backend
    # The warm snapshot pool sandboxes are restored from (built on first need).
    snapshot_id: str | None = None
    hits: int = 0
    misses: int = 0
    last_error: str = ""


class PoolList(_Response, kw_only=True):
    items: list[PoolInfo]


class SetPoolBody(_Request, kw_only=True):
    """Keep `size` restored, ready sandboxes of a template, so creating one is a hit."""

    size: Annotated[int, Meta(ge=0, le=MAX_POOL_SIZE)]
    backend: Backend = Backend.AUTO
