"""Helpers for tests of Cerberus: keys made through the owner's unix socket, requests
over TCP with a bearer token, sandbox records seeded into a server's state."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tartarus.node.store import SandboxRecord, Store
from tartarus.runtime.types import Backend, SandboxState
from tartarus.snapshots.catalog import SnapshotCatalog, SnapshotPurpose, SnapshotRecord
from tests.support.server import Reply, Server


def make_key(server: Server, tenant: str, roles: list[str], name: str = "test") -> tuple[str, str]:
    """Creates an API key as the local operator; returns (key id, token)."""
    r = server.json("POST", "/v1/auth/keys", {"name": name, "roles": roles, "tenant": tenant})
    assert r.status == 201, r.body
    created = r.json()
    return created["key"]["id"], created["token"]


def call(
    server: Server,
    token: str | None,
    method: str,
    path: str,
    payload: Any = None,
    *,
    body: bytes | None = None,
) -> Reply:
    """A request over TCP with `Authorization: Bearer <token>` (none if token is None)."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if payload is not None:
        headers["Content-Type"] = "application/json"
        body = json.dumps(payload).encode()
    return server.raw(method, path, body, headers, tcp=True)


def seed_sandboxes(state_dir: Path, owners: dict[str, str]) -> None:
    """Writes ended sandbox records (id → tenant) into a server's state before it starts."""
    store = Store(state_dir / "server.db")
    try:
        for sandbox_id, tenant in owners.items():
            store.insert(
                SandboxRecord(
                    id=sandbox_id,
                    template="base",
                    backend=Backend.JAIL,
                    state=SandboxState.STOPPED,
                    created_at=time.time(),
                    ended_at=time.time(),
                    tenant=tenant,
                    detail="seeded by a test",
                )
            )
    finally:
        store.close()


def seed_snapshots(state_dir: Path, owners: dict[str, str]) -> None:
    """Writes snapshot records (id → tenant) into a server's state before it starts; their
    files do not exist (enough for access checks)."""
    catalog = SnapshotCatalog(state_dir / "server.db")
    try:
        for snapshot_id, tenant in owners.items():
            catalog.insert(
                SnapshotRecord(
                    id=snapshot_id,
                    backend=Backend.GVISOR,
                    template="base",
                    purpose=SnapshotPurpose.USER,
                    created_at=time.time(),
                    size_bytes=0,
                    blob="sha256:" + "0" * 64,
                    blob_kind="tree",
                    tenant=tenant,
                )
            )
    finally:
        catalog.close()
