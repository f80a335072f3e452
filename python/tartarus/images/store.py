"""`TemplateStore`: the API other components call to get a template's root filesystem.

    store = TemplateStore()                       # settings from tartarus.toml / env
    t = await store.resolve("python")             # builds on first use, cached after
    t.rootfs                                      # directory for gVisor and the jail
    t.ext4                                        # ext4 image for the microVM
    t.manifest.env, t.manifest.resources, ...     # what the template asks for

Templates are the built-in ones (shipped with the package) plus those registered with
`register()` (`tartarus template build FILE`), which may shadow a built-in. Each
template holds references on its blobs as owner `template:<id>`; `remove()` drops them
and garbage-collects. Trees are shared and immutable: mount them read-only.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import msgspec

from tartarus.config import Settings, load_settings
from tartarus.images import fsutil
from tartarus.images.blobs import BlobStore, GcReport, LocalBlobStore
from tartarus.images.errors import TemplateNotFoundError
from tartarus.images.progress import ProgressCallback, ignore
from tartarus.images.template import (
    LoadedTemplate,
    Template,
    builtin_templates,
    from_json,
    load_template,
    to_json,
)
from tartarus.runtime.types import Backend, Resources
from tartarus.sqlite_wal import ThreadConnections

if TYPE_CHECKING:
    from tartarus.images.build import BuildRecord

# A partial download nobody resumed for this long is dropped by gc().
STALE_DOWNLOAD_S = 7 * 24 * 3600


def template_owner(template_id: str) -> str:
    return f"template:{template_id}"


class TemplateManifest(msgspec.Struct, frozen=True, kw_only=True):
    """A built template: where its outputs are and what it asks of a sandbox."""

    id: str
    description: str
    source: str
    key: str
    rootfs: str
    ext4: str | None
    layers: list[str]
    base: str
    agent: str
    env: dict[str, str]
    workdir: str
    user: str | None
    entrypoint: list[str]
    cmd: list[str]
    resources: Resources
    max_resources: Resources | None
    timeout_s: float
    backends: list[Backend]
    warmup: str | None
    size_bytes: int
    files: int
    built_at: float
    build_seconds: float


class ResolvedTemplate(msgspec.Struct, frozen=True, kw_only=True):
    manifest: TemplateManifest
    rootfs: Path
    ext4: Path | None

    @property
    def id(self) -> str:
        return self.manifest.id


class TemplateInfo(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    description: str
    source: str
    builtin: bool
    built: bool
    manifest: TemplateManifest | None = None


class RemoveReport(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    unregistered: bool
    released: int
    gc: GcReport


def manifest_of(loaded: LoadedTemplate, record: BuildRecord) -> TemplateManifest:
    t = loaded.template
    config = record.content.config
    return TemplateManifest(
        id=t.id,
        description=t.description,
        source=loaded.source,
        key=record.key,
        rootfs=record.rootfs,
        ext4=record.ext4,
        layers=record.content.layers,
        base=record.content.base,
        agent=record.agent,
        env={**config.env, **t.env},
        workdir=t.workdir if t.workdir != "/" else (config.workdir or "/"),
        user=config.user,
        entrypoint=config.entrypoint,
        cmd=config.cmd,
        resources=t.resources,
        max_resources=t.max_resources,
        timeout_s=t.timeout_s,
        backends=t.backends,
        warmup=t.warmup,
        size_bytes=record.size,
        files=record.files,
        built_at=record.built_at,
        build_seconds=round(record.content.seconds + record.seconds, 3),
    )


class TemplateStore:
    """Templates, their builds, and the blob store under them."""

    def __init__(self, settings: Settings | None = None, *, blobs: BlobStore | None = None) -> None:
        settings = settings or load_settings()
        self.state_dir = settings.state_dir / "images"
        self.cache_dir = settings.cache_dir / "images"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blobs: BlobStore = blobs or LocalBlobStore(self.state_dir)
        self._connections = ThreadConnections(self.state_dir / "templates.sqlite")
        with self._db() as db:
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS templates (
                    id TEXT PRIMARY KEY,
                    definition BLOB NOT NULL,
                    source TEXT NOT NULL,
                    source_dir TEXT NOT NULL,
                    updated REAL NOT NULL
                );
                CREATE TABLE IF NOT EXISTS manifests (
                    id TEXT PRIMARY KEY,
                    manifest BLOB NOT NULL
                );
                """
            )

    def close(self) -> None:
        """Closes this store's database connections and its blob store's (they reopen on
        the next call): what lets the disk under them be unmounted."""
        self._connections.close()
        self.blobs.close()

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._connections.connect()

    # -- definitions -------------------------------------------------------------------

    def _registered(self, template_id: str | None = None) -> dict[str, LoadedTemplate]:
        """Registered templates: all, or only `template_id` (every create looks one up;
        decoding them all cost milliseconds once a store held a few dozen)."""
        sql = "SELECT definition, source, source_dir FROM templates"
        with self._db() as db:
            if template_id is None:
                rows = db.execute(sql).fetchall()
            else:
                rows = db.execute(f"{sql} WHERE id = ?", (template_id,)).fetchall()
        out = {}
        for definition, source, source_dir in rows:
            template = from_json(definition)
            out[template.id] = LoadedTemplate(
                template=template, source=source, source_dir=Path(source_dir)
            )
        return out

    def definitions(self) -> dict[str, LoadedTemplate]:
        """Every known template: built-ins, shadowed by registered ones of the same id."""
        return {**builtin_templates(), **self._registered()}

    def get(self, template_id: str) -> LoadedTemplate:
        found = self._registered(template_id).get(template_id)
        found = found or builtin_templates().get(template_id)
        if found is None:
            raise TemplateNotFoundError(template_id, list(self.definitions()))
        return found

    def register(self, path: Path) -> LoadedTemplate:
        """Adds (or replaces) a template from a YAML/TOML file; returns it."""
        loaded = load_template(path)
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO templates (id, definition, source, source_dir, updated) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    loaded.template.id,
                    to_json(loaded.template),
                    str(path.resolve()),
                    str(loaded.source_dir),
                    time.time(),
                ),
            )
        return loaded

    # -- builds ------------------------------------------------------------------------

    async def resolve(
        self,
        template_id: str,
        *,
        ext4: bool = True,
        pull: bool = False,
        owner: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> ResolvedTemplate:
        """The template's rootfs (and ext4 image unless `ext4=False`), built if needed.

        `pull`: look up a registry tag again instead of using the digest it was pinned
        to. `owner` (e.g. `sandbox:<id>`) also takes references on the outputs, so they
        outlive a rebuild or removal of the template until `release(owner)`.
        """
        loaded = self.get(template_id)
        return await self._build(loaded, ext4=ext4, pull=pull, owner=owner, progress=progress)

    async def build(
        self,
        template: str | Path,
        *,
        ext4: bool = True,
        pull: bool = False,
        progress: ProgressCallback | None = None,
    ) -> ResolvedTemplate:
        """Builds a template by id, or registers a template file and builds it."""
        if isinstance(template, Path):
            loaded = await anyio.to_thread.run_sync(self.register, template)
        else:
            loaded = self.get(template)
        return await self._build(loaded, ext4=ext4, pull=pull, owner=None, progress=progress)

    async def _build(
        self,
        loaded: LoadedTemplate,
        *,
        ext4: bool,
        pull: bool,
        owner: str | None,
        progress: ProgressCallback | None,
    ) -> ResolvedTemplate:
        # The builder pulls in the HTTP client (aiohttp); listing and lookups do not.
        from tartarus.images.build import Builder  # noqa: PLC0415

        builder = Builder(self.blobs, self.cache_dir, progress or ignore, self.state_dir)
        tid = loaded.template.id
        try:
            record = await builder.lookup(loaded, pull=pull)
            if (
                record
                and (not ext4 or record.ext4)
                and await self.blobs.take_if_held(
                    owner,
                    record.outputs(ext4=ext4),
                    holder=template_owner(tid),
                    held=record.digests(),
                )
            ):
                # The template already holds every output: nothing to build or write.
                return await self._resolved(loaded, record, ext4)
            async with self.blobs.lease() as lease:
                record = await builder.rootfs(loaded, lease, ext4=ext4, pull=pull)
                await self.blobs.set_refs(template_owner(tid), record.digests())
                if owner is not None:
                    await self.blobs.add_refs(owner, record.outputs(ext4=ext4))
        finally:
            await builder.aclose()
        return await self._resolved(loaded, record, ext4)

    async def _resolved(
        self, loaded: LoadedTemplate, record: BuildRecord, ext4: bool
    ) -> ResolvedTemplate:
        manifest = manifest_of(loaded, record)
        await anyio.to_thread.run_sync(self._save_manifest, manifest)
        return ResolvedTemplate(
            manifest=manifest,
            rootfs=await self.blobs.local_path(record.rootfs),
            ext4=await self.blobs.local_path(record.ext4) if ext4 and record.ext4 else None,
        )

    def _save_manifest(self, manifest: TemplateManifest) -> None:
        encoded = msgspec.json.encode(manifest)
        with self._db() as db:
            row = db.execute("SELECT manifest FROM manifests WHERE id = ?", (manifest.id,))
            if (stored := row.fetchone()) is not None and stored[0] == encoded:
                return
            db.execute(
                "INSERT OR REPLACE INTO manifests (id, manifest) VALUES (?, ?)",
                (manifest.id, encoded),
            )

    def _manifests(self) -> dict[str, TemplateManifest]:
        with self._db() as db:
            rows = db.execute("SELECT id, manifest FROM manifests").fetchall()
        return {i: msgspec.json.decode(m, type=TemplateManifest) for i, m in rows}

    async def release(self, owner: str) -> int:
        """Drops the references `owner` took through `resolve(owner=...)`."""
        return await self.blobs.release(owner)

    # -- inspection --------------------------------------------------------------------

    async def list(self) -> list[TemplateInfo]:
        definitions = await anyio.to_thread.run_sync(self.definitions)
        manifests = await anyio.to_thread.run_sync(self._manifests)
        out = []
        for tid, loaded in sorted(definitions.items()):
            manifest = manifests.get(tid)
            built = manifest is not None and await self.blobs.has(manifest.rootfs)
            out.append(
                TemplateInfo(
                    id=tid,
                    description=loaded.template.description,
                    source=loaded.source,
                    builtin=loaded.builtin,
                    built=built,
                    manifest=manifest if built else None,
                )
            )
        return out

    async def inspect(self, template_id: str) -> TemplateInfo:
        for info in await self.list():
            if info.id == template_id:
                return info
        raise TemplateNotFoundError(template_id, [i.id for i in await self.list()])

    def definition(self, template_id: str) -> Template:
        return self.get(template_id).template

    async def remove(self, template_id: str) -> RemoveReport:
        """Forgets a template's build (and its registration, if not built in), drops its
        references and garbage-collects what nothing else uses."""
        loaded = self.get(template_id)

        def forget() -> bool:
            with self._db() as db:
                db.execute("DELETE FROM manifests WHERE id = ?", (template_id,))
                return db.execute("DELETE FROM templates WHERE id = ?", (template_id,)).rowcount > 0

        unregistered = await anyio.to_thread.run_sync(forget)
        owner = template_owner(template_id)
        released = len(await self.blobs.refs(owner))
        report = await self.blobs.gc(release=[owner])
        return RemoveReport(
            id=loaded.template.id, unregistered=unregistered, released=released, gc=report
        )

    async def gc(self) -> GcReport:
        """Deletes unreferenced blobs, and downloads cut off more than a week ago."""
        await anyio.to_thread.run_sync(self._sweep_downloads)
        return await self.blobs.gc()

    def _sweep_downloads(self) -> None:
        downloads = self.cache_dir / "downloads"
        if not downloads.is_dir():
            return
        cutoff = time.time() - STALE_DOWNLOAD_S
        for entry in downloads.iterdir():
            if entry.suffix == ".lock":
                continue  # may be held right now; deleting it would split the lock
            with contextlib.suppress(FileNotFoundError):
                if entry.lstat().st_mtime < cutoff:
                    fsutil.remove_tree(entry)
