"""Snapshots and warm pools on a Tartarus server (Nyx).

    async with await Snapshots.connect() as snaps:
        warm = await snaps.create("python")        # start, warm up, snapshot
        sb = await snaps.restore(warm.id)          # a running copy
        await snaps.set_pool("python", 4)          # keep 4 ready: creates become hits

A running sandbox is snapshotted with `sandbox.snapshot()` and copied with
`sandbox.fork(count)`; `Sandbox.create(from_snapshot=...)` restores.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from tartarus.api.sandbox import Backend
from tartarus.api.snapshots import (
    PoolInfo,
    PoolList,
    PruneReport,
    RestoreBody,
    SetPoolBody,
    SnapshotEntry,
    SnapshotPage,
    SnapshotPurpose,
    TemplateSnapshotBody,
)
from tartarus.api.types import ResourcesBody, SandboxInfo
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox


class Snapshots:
    def __init__(self, client: Client, *, owns_client: bool = True) -> None:
        self._client = client
        self._owns_client = owns_client

    @classmethod
    async def connect(cls, url: str | None = None, *, api_key: str | None = None) -> Snapshots:
        return cls(await Client.connect(url, api_key=api_key))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.close()

    async def __aenter__(self) -> Snapshots:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- snapshots ---------------------------------------------------------------------

    async def iterate(
        self, *, template: str | None = None, purposes: builtins.list[SnapshotPurpose] | None = None
    ) -> AsyncIterator[SnapshotEntry]:
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {
                "template": template,
                "purpose": [p.value for p in purposes or []],
                "cursor": cursor,
            }
            page = await self._client.call("GET", "/v1/snapshots", SnapshotPage, params=params)
            for entry in page.items:
                yield entry
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list(
        self, *, template: str | None = None, purposes: builtins.list[SnapshotPurpose] | None = None
    ) -> list[SnapshotEntry]:
        """Every snapshot on the server (oldest first), optionally filtered."""
        return [e async for e in self.iterate(template=template, purposes=purposes)]

    async def get(self, snapshot_id: str) -> SnapshotEntry:
        return await self._client.call("GET", f"/v1/snapshots/{snapshot_id}", SnapshotEntry)

    async def delete(self, snapshot_id: str) -> None:
        """Deletes the snapshot; its files go once no restored sandbox holds them."""
        await self._client.call("DELETE", f"/v1/snapshots/{snapshot_id}")

    async def create(
        self,
        template: str,
        *,
        backend: Backend | str = Backend.AUTO,
        resources: ResourcesBody | None = None,
        label: str = "",
    ) -> SnapshotEntry:
        """A template's warm snapshot: start it, run its warm-up script, snapshot it."""
        body = TemplateSnapshotBody(
            template=template,
            backend=Backend(backend),
            resources=resources or ResourcesBody(),
            label=label,
        )
        return await self._client.call("POST", "/v1/snapshots", SnapshotEntry, json=body)

    async def restore(
        self,
        snapshot_id: str,
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        checkpoint_on_stop: bool = False,
    ) -> Sandbox:
        """A running sandbox restored from the snapshot (with its own connection);
        `timeout` unset: the server decides, as for a create."""
        body = RestoreBody(
            timeout_s=timeout, metadata=metadata or {}, checkpoint_on_stop=checkpoint_on_stop
        )
        info = await self._client.call(
            "POST", f"/v1/snapshots/{snapshot_id}/restore", SandboxInfo, json=body
        )
        return Sandbox(self._client.copy(), info)

    async def prune(
        self,
        *,
        older_than: float | None = None,
        keep: int | None = None,
        template: str | None = None,
        purposes: builtins.list[SnapshotPurpose] | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Deletes snapshots older than `older_than` seconds and/or beyond the newest
        `keep` per template (user and checkpoint snapshots unless `purposes` says)."""
        params: dict[str, Any] = {
            "older_than_s": older_than,
            "keep": keep,
            "template": template,
            "dry_run": dry_run,
        }
        if purposes is not None:
            params["purpose"] = [p.value for p in purposes]
        return await self._client.call("DELETE", "/v1/snapshots", PruneReport, params=params)

    # --- warm pools ---------------------------------------------------------------------

    async def pools(self) -> builtins.list[PoolInfo]:
        return (await self._client.call("GET", "/v1/pools", PoolList)).items

    async def set_pool(
        self, template: str, size: int, *, backend: Backend | str = Backend.AUTO
    ) -> PoolInfo:
        """Keeps `size` ready sandboxes of `template` (0 empties the pool)."""
        body = SetPoolBody(size=size, backend=Backend(backend))
        return await self._client.call("PUT", f"/v1/pools/{template}", PoolInfo, json=body)
