"""The snapshot service: takes snapshots of running sandboxes, files them in the blob
store, restores sandboxes from them, and builds a template's warm snapshot.

A snapshot's files (the backend's snapshot directory: `vm.snap` and disk copies for a
microVM, the checkpoint image for gVisor) become one tree blob in the blob store, owned
by `snapshot:<id>`; an incremental snapshot's owner also holds its parent's blob, so
the parent's files stay while the child needs them. A sandbox restored from a snapshot
holds the same blobs as `sandbox:<id>` while it lives (a microVM maps them), so
deleting a snapshot never pulls files from under a running clone; files go when the
last owner lets go.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path

import anyio
import msgspec

from tartarus.errors import ConflictError, NotFoundError, TartarusError
from tartarus.images.blobs import BlobStore, GcReport
from tartarus.node.manager import new_sandbox_id
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.base import (
    BackendUnavailableError,
    NotSupportedError,
    Runtime,
    Sandbox,
    SandboxError,
)
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    Resources,
    SandboxSpec,
    SnapshotInfo,
    TrustLevel,
)
from tartarus.snapshots.catalog import (
    SnapshotCatalog,
    SnapshotPurpose,
    SnapshotRecord,
    new_snapshot_id,
)

log = logging.getLogger(__name__)

# Progress of a long operation: (step, message).
Progress = Callable[[str, str], None]

# How long a template's warm-up script may run before the snapshot is abandoned.
WARMUP_TIMEOUT_S = 600.0


class SnapshotError(TartarusError):
    """A snapshot could not be taken, stored, found or restored; the message says why."""


class SnapshotNotFoundError(SnapshotError):
    def __init__(self, snapshot_id: str) -> None:
        super().__init__(f"no snapshot {snapshot_id}; `tartarus snapshot list` shows them")


@contextlib.contextmanager
def failures_as(action: str, slug: str, *, not_supported_as_is: bool = False) -> Iterator[None]:
    """Nyx's and the backends' failures as the errors the API answers with: a missing
    snapshot is NotFoundError, any other ConflictError `slug` ("cannot ACTION: why").
    `not_supported_as_is`: a backend that cannot do it at all stays NotSupportedError."""
    try:
        yield
    except SnapshotNotFoundError as e:
        raise NotFoundError(str(e)) from e
    except (SnapshotError, SandboxError) as e:
        if not_supported_as_is and isinstance(e, NotSupportedError):
            raise
        raise ConflictError(f"cannot {action}: {e}", slug=slug) from e


SANDBOX_OWNER_PREFIX = "sandbox-snapshot:"
# The tenant of a snapshot every tenant may use (a template's warm snapshot).
SHARED_TENANT = "*"


def sandbox_owner(sandbox_id: str) -> str:
    """The blob store owner a restored sandbox holds its snapshot's files as."""
    return SANDBOX_OWNER_PREFIX + sandbox_id


class Origin(msgspec.Struct, frozen=True):
    """A snapshot a sandbox was restored from: its id and blob (and its parent's), the
    files an incremental snapshot of that sandbox may build on."""

    snapshot: str
    blob: str
    parent: str | None = None
    parent_blob: str | None = None


class SandboxFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What a snapshot records about the sandbox it came from (restores reuse it)."""

    template: str
    resources: Resources = msgspec.field(default_factory=Resources)
    network: bool = False
    trust: TrustLevel = TrustLevel.UNTRUSTED
    origin: Origin | None = None
    # Who owns snapshots of it ("*": every tenant, for template snapshots).
    tenant: str = "default"


# A restore's result: the sandbox, its runtime, what it is, and its working directory.
Restored = tuple[Sandbox, Runtime, SandboxFacts, str]


class SnapshotService:
    """Nyx's snapshot operations over the runtime, the blob store and the catalog."""

    def __init__(
        self,
        catalog: SnapshotCatalog,
        blobs: BlobStore,
        provider: HostRuntimes,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.provider = provider

    # --- queries ---------------------------------------------------------------------

    def get(self, snapshot_id: str) -> SnapshotRecord:
        record = self.catalog.get(snapshot_id)
        if record is None:
            raise SnapshotNotFoundError(snapshot_id)
        return record

    async def files_of(self, record: SnapshotRecord) -> SnapshotInfo:
        """The snapshot's files on local disk, as the backend's `restore` wants them."""
        base = None
        if record.parent_blob is not None:
            base = await self.blobs.local_path(record.parent_blob)
        return SnapshotInfo(
            backend=record.backend,
            path=await self.blobs.local_path(record.blob),
            size_bytes=record.size_bytes,
            source_sandbox=record.source_sandbox or "",
            base=base,
        )

    # --- taking and filing -----------------------------------------------------------

    async def take(
        self,
        sandbox: Sandbox,
        facts: SandboxFacts,
        *,
        purpose: SnapshotPurpose,
        label: str = "",
        metadata: dict[str, str] | None = None,
    ) -> SnapshotRecord:
        """Snapshots a running sandbox (it keeps running) and files the result."""
        return await self._capture(
            sandbox.snapshot, facts, purpose=purpose, label=label, metadata=metadata
        )

    async def suspend(self, sandbox: Sandbox, facts: SandboxFacts) -> SnapshotRecord:
        """Snapshots a running sandbox and ends it (a pause, Hypnos); files the result
        as a `pause` snapshot. If the snapshot cannot be written the sandbox runs on."""
        return await self._capture(sandbox.suspend, facts, purpose=SnapshotPurpose.PAUSE)

    async def _capture(
        self,
        write: Callable[[Path], Awaitable[SnapshotInfo]],
        facts: SandboxFacts,
        *,
        purpose: SnapshotPurpose,
        label: str = "",
        metadata: dict[str, str] | None = None,
    ) -> SnapshotRecord:
        staging = await self.blobs.new_staging("snapshot")
        try:
            info = await write(staging)
            return await self._file(
                info, staging, facts, purpose=purpose, label=label, metadata=metadata
            )
        finally:
            # put_tree consumed it on success; anything left is from a failure.
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)

    async def adopt(
        self,
        directory: Path,
        backend: Backend,
        facts: SandboxFacts,
        *,
        purpose: SnapshotPurpose = SnapshotPurpose.USER,
        label: str = "",
    ) -> SnapshotRecord:
        """Files a full snapshot a backend wrote outside Nyx (through the VMM's API, or
        copied from another host): `directory` is what the backend's `snapshot` writes."""
        staging = await self.blobs.new_staging("snapshot")
        try:
            result = await anyio.run_process(
                ["cp", "-a", "--sparse=always", "--reflink=auto", f"{directory}/.", str(staging)],
                check=False,
            )
            if result.returncode != 0:
                raise SnapshotError(
                    f"cannot copy {directory}: {result.stderr.decode(errors='replace')[-300:]}"
                )
            info = SnapshotInfo(backend=backend, path=staging, size_bytes=0, source_sandbox="")
            return await self._file(
                info, staging, facts, purpose=purpose, label=label, metadata=None
            )
        finally:
            await anyio.to_thread.run_sync(shutil.rmtree, staging, True)

    async def _file(
        self,
        info: SnapshotInfo,
        staging: Path,
        facts: SandboxFacts,
        *,
        purpose: SnapshotPurpose,
        label: str,
        metadata: dict[str, str] | None,
    ) -> SnapshotRecord:
        if info.path != staging:
            raise SnapshotError(
                f"the {info.backend.value} backend wrote its snapshot to {info.path}, "
                f"not to the directory it was given ({staging})"
            )
        parent, parent_blob = await self._parent_of(info, facts)
        snapshot_id = new_snapshot_id()
        owner = f"snapshot:{snapshot_id}"
        stored = await self.blobs.put_tree(staging, owner=owner)
        if parent_blob is not None:
            await self.blobs.add_refs(owner, [parent_blob])
        record = SnapshotRecord(
            id=snapshot_id,
            backend=info.backend,
            template=facts.template,
            purpose=purpose,
            created_at=time.time(),
            size_bytes=stored.size,
            blob=stored.digest,
            blob_kind="tree",
            parent=parent,
            parent_blob=parent_blob,
            source_sandbox=info.source_sandbox or None,
            label=label,
            resources=facts.resources,
            network=facts.network,
            trust=facts.trust,
            metadata=dict(metadata or {}),
            tenant=facts.tenant,
        )
        try:
            return self.catalog.insert(record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.blobs.release(owner)
            raise

    async def _parent_of(
        self, info: SnapshotInfo, facts: SandboxFacts
    ) -> tuple[str | None, str | None]:
        """The snapshot (and blob) an incremental snapshot applies to: the files the
        backend named as its base are those of the snapshot the sandbox was restored
        from, or of that one's parent."""
        if info.base is None:
            return None, None
        o = facts.origin
        if o is not None:
            for snapshot_id, blob in ((o.snapshot, o.blob), (o.parent, o.parent_blob)):
                if blob is not None and await self.blobs.local_path(blob) == info.base:
                    return snapshot_id, blob
        raise SnapshotError(
            f"the snapshot builds on {info.base}, which are not a stored snapshot's files"
        )

    # --- restoring ---------------------------------------------------------------------

    async def restore(self, snapshot_id: str, spec: SandboxSpec) -> Restored:
        """Starts a sandbox from a snapshot on the snapshot's backend; returns it, its
        runtime, what it is, and its working directory. The sandbox holds the
        snapshot's files (and its template's) until `release(sandbox id)`."""
        record = self.get(snapshot_id)
        spec = msgspec.structs.replace(
            spec,
            template=record.template,
            backend=record.backend,
            resources=record.resources,
            network=record.network,
            trust=record.trust,
        )
        try:
            runtime = self.provider.runtime(record.backend)
        except BackendUnavailableError as e:
            raise SnapshotError(
                f"snapshot {snapshot_id} needs the {record.backend.value} backend: {e}"
            ) from e
        await self.blobs.add_refs(sandbox_owner(spec.id), self._blobs_of(record))
        try:
            spec, manifest = await self.provider.prepare(spec, record.backend)
            sandbox = await runtime.restore(await self.files_of(record), spec)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.release(spec.id)
            raise
        if not record.verified:
            record.verified = True
            self.catalog.save(record)
        return sandbox, runtime, facts_of(record), manifest.workdir

    @staticmethod
    def _blobs_of(record: SnapshotRecord) -> list[str]:
        return [record.blob] + ([record.parent_blob] if record.parent_blob else [])

    async def release(self, sandbox_id: str) -> None:
        """A restored sandbox ended: its hold on snapshot files goes (files nobody else
        holds are deleted). The manager releases a sandbox's template itself; this
        also does for sandboxes it never saw (a pool's)."""
        await self.provider.release(sandbox_id)
        if await self.blobs.release(sandbox_owner(sandbox_id)):
            await self.blobs.gc()

    async def release_orphans(self) -> int:
        """Drops holds of sandboxes that no longer exist (a server that died left them;
        the next server reaps every sandbox at start). Returns how many went."""
        released = 0
        for blob in await self.blobs.list_blobs():
            for owner in await self.blobs.owners(blob.digest):
                if owner.startswith(SANDBOX_OWNER_PREFIX):
                    released += await self.blobs.release(owner)
        if released:
            await self.blobs.gc()
        return released

    # --- deleting ------------------------------------------------------------------------

    async def delete(self, snapshot_id: str) -> GcReport:
        """Forgets a snapshot and deletes its files unless a child snapshot or a running
        sandbox still holds them."""
        record = self.get(snapshot_id)
        self.catalog.remove(record.id)
        return await self.blobs.gc(release=[record.owner])

    async def delete_many(self, records: Iterable[SnapshotRecord]) -> tuple[list[str], GcReport]:
        """Forgets several snapshots; returns the ids removed and what the GC freed."""
        removed = [record for record in records if self.catalog.remove(record.id)]
        report = await self.blobs.gc(release=[record.owner for record in removed])
        return [record.id for record in removed], report

    # --- template snapshots ----------------------------------------------------------------

    async def build_template(
        self,
        template: str,
        *,
        backend: Backend = Backend.AUTO,
        resources: Resources | None = None,
        label: str = "",
        progress: Progress | None = None,
    ) -> SnapshotRecord:
        """Starts a sandbox of `template`, runs the template's warm-up script, snapshots
        it and stops it: restores of this snapshot start warm."""
        say = progress or _quiet
        spec = SandboxSpec(
            id=new_sandbox_id(),
            template=template,
            backend=backend,
            resources=resources or Resources(),
        )
        runtime, reason = await self.provider.select(spec)
        say("preparing", f"resolving template {template}")
        spec, manifest = await self.provider.prepare(spec, runtime.backend)
        say("starting", f"starting a {runtime.backend.value} sandbox ({reason})")
        try:
            sandbox = await runtime.create(spec)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.provider.release(spec.id)
            raise
        try:
            await sandbox.start()
            if manifest.warmup:
                say("warming", "running the template's warm-up script")
                await self._warm_up(sandbox, manifest.warmup, manifest.workdir)
            say("snapshotting", "taking the snapshot")
            facts = SandboxFacts(
                template=template,
                resources=spec.resources,
                network=spec.network,
                trust=spec.trust,
                tenant=SHARED_TENANT,
            )
            return await self.take(sandbox, facts, purpose=SnapshotPurpose.TEMPLATE, label=label)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await sandbox.kill()
                except Exception:
                    log.exception("stopping the template builder %s failed", sandbox.id)
                await self.provider.release(spec.id)

    async def _warm_up(self, sandbox: Sandbox, script: str, workdir: str) -> None:
        request = ExecRequest(shell=script, cwd=workdir, timeout_s=WARMUP_TIMEOUT_S)
        execution = await sandbox.exec(request)
        result = await execution.wait()
        if not result.exit.ok:
            tail = (result.stderr or result.stdout)[-2000:].decode(errors="replace")
            raise SnapshotError(
                f"the warm-up script failed (exit {result.exit.code}, signal "
                f"{result.exit.signal}): {tail.strip()}"
            )


def facts_of(record: SnapshotRecord) -> SandboxFacts:
    """A sandbox restored from `record` is what the snapshot recorded, descended from it."""
    return SandboxFacts(
        template=record.template,
        resources=record.resources,
        network=record.network,
        trust=record.trust,
        origin=Origin(record.id, record.blob, record.parent, record.parent_blob),
        tenant=record.tenant,
    )


def _quiet(step: str, message: str) -> None:
    log.debug("template snapshot: %s: %s", step, message)
