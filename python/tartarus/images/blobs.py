"""The blob store: content-addressed (sha256) files and directory trees with
reference counts and garbage collection.

Every blob is named by the digest of its content. Owners (`template:python`,
`snapshot:abc`, `sandbox:xyz`, or a build's temporary lease) hold references; a blob
with no reference is garbage and `gc()` deletes it. Writes are atomic: content is
written under `tmp/`, flushed, then renamed into place in the same SQLite transaction
that records it, so a crash never leaves a half-written blob visible, and a concurrent
`gc()` (which takes the same write lock) never deletes a blob being committed.

`BlobStore` is the interface; `LocalBlobStore` keeps blobs on local disk. An
S3-compatible store implements the same protocol (trees are local-only artefacts there:
it would keep them in a local cache and upload their archive).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.to_thread
import msgspec

from tartarus.images import digest as digests
from tartarus.images import fsutil
from tartarus.images.errors import BlobNotFoundError, DigestMismatchError, ImageError
from tartarus.sqlite_wal import ThreadConnections

T = TypeVar("T")

SCHEMA_VERSION = 1
LEASE_PREFIX = "lease:"


class BlobKind(StrEnum):
    FILE = "file"
    TREE = "tree"


class BlobInfo(msgspec.Struct, frozen=True, kw_only=True):
    digest: str
    kind: BlobKind
    size: int
    media_type: str | None = None
    created: float = 0.0
    refs: int = 0


class GcReport(msgspec.Struct, frozen=True, kw_only=True):
    removed: list[str]
    freed_bytes: int
    stale_leases: list[str]


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed storage with owner references. All methods are safe to call
    from several processes at once."""

    async def put_file(
        self,
        src: Path,
        *,
        owner: str,
        expected: str | None = None,
        media_type: str | None = None,
        move: bool = False,
    ) -> BlobInfo:
        """Stores a file (copied, or moved if `move`), verifying `expected` if given,
        and gives `owner` a reference to it."""
        ...

    async def put_tree(self, staging: Path, *, owner: str) -> BlobInfo:
        """Stores a directory tree built in `new_staging()`; consumes `staging`."""
        ...

    async def new_staging(self, label: str) -> Path:
        """An empty directory on the store's filesystem for building content; removed by
        `put_tree`, or by `gc()` once the process that made it is gone."""
        ...

    async def stat(self, digest: str) -> BlobInfo: ...

    async def has(self, digest: str) -> bool: ...

    async def local_path(self, digest: str) -> Path:
        """A local path with the blob's content (a file or a directory). Read-only."""
        ...

    async def add_refs(self, owner: str, digests: Iterable[str]) -> None: ...

    def close(self) -> None:
        """Closes the index's database connections (the next call opens new ones)."""
        ...

    async def set_refs(self, owner: str, digests: Iterable[str]) -> None:
        """Makes `owner` reference exactly `digests` (all must exist), atomically."""
        ...

    async def refs(self, owner: str) -> list[str]: ...

    async def take_if_held(
        self, owner: str | None, digests: Iterable[str], *, holder: str, held: Iterable[str]
    ) -> bool:
        """If `holder` references every one of `held`, `owner` (when given) takes
        references on `digests`, in the same transaction: a rebuild that moves the
        holder's references meanwhile cannot leave `owner` holding what it replaced.
        False, and nothing taken, otherwise."""
        ...

    async def owners(self, digest: str) -> list[str]: ...

    async def release(self, owner: str) -> int:
        """Drops every reference `owner` holds; returns how many."""
        ...

    async def gc(self, *, release: Sequence[str] = ()) -> GcReport:
        """Deletes every blob nobody references; returns what went. The owners in
        `release` drop their references first, in the same transaction, so what they
        alone held is in this report and not in a concurrent gc's."""
        ...

    async def list_blobs(self) -> list[BlobInfo]: ...

    def lease(self) -> contextlib.AbstractAsyncContextManager[str]:
        """A temporary owner for content being built: released on exit, and treated as
        stale by `gc()` if the process that took it has died."""
        ...


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(name: str) -> int | None:
    head = name.split("-", 1)[0].split(":", 1)[0]
    return int(head) if head.isdigit() else None


_SELECT_INFO = (
    "SELECT digest, kind, size, media_type, created, "
    "(SELECT COUNT(*) FROM refs r WHERE r.digest = b.digest) FROM blobs b"
)


def _row_info(row: Any) -> BlobInfo:
    digest, kind, size, media_type, created, refs = row
    return BlobInfo(
        digest=digest,
        kind=BlobKind(kind),
        size=size,
        media_type=media_type,
        created=created,
        refs=refs,
    )


class LocalBlobStore:
    """Blobs under `root`: `blobs/sha256/<hex>` (files, read-only), `trees/sha256/<hex>/`
    (directories), `tmp/` (staging), `trash/` (being deleted), `blobs.sqlite` (index)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = root / "blobs" / "sha256"
        self._trees = root / "trees" / "sha256"
        self._tmp = root / "tmp"
        self._trash = root / "trash"
        self._db_path = root / "blobs.sqlite"
        self._connections = ThreadConnections(self._db_path)
        for d in (self._files, self._trees, self._tmp, self._trash):
            d.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS blobs (
                    digest TEXT PRIMARY KEY,
                    kind TEXT NOT NULL,
                    size INTEGER NOT NULL,
                    media_type TEXT,
                    created REAL NOT NULL
                );
                CREATE TABLE IF NOT EXISTS refs (
                    owner TEXT NOT NULL,
                    digest TEXT NOT NULL REFERENCES blobs(digest),
                    PRIMARY KEY (owner, digest)
                );
                CREATE INDEX IF NOT EXISTS refs_by_digest ON refs(digest);
                """
            )
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise ImageError(
                    f"{self._db_path} has schema version {version}; this Tartarus "
                    f"understands {SCHEMA_VERSION}. Upgrade Tartarus or move the store away."
                )

    # -- plumbing ----------------------------------------------------------------------

    def close(self) -> None:
        self._connections.close()

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # WAL + NORMAL: a power cut can lose only the last transactions, which leaves
        # orphans (swept by gc), never corruption.
        return self._connections.connect()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; it serialises commits and gc() across processes."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @staticmethod
    async def _run(fn: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(fn)

    def _path(self, digest: str, kind: BlobKind) -> Path:
        base = self._files if kind is BlobKind.FILE else self._trees
        return base / digests.hex_of(digest)

    def _new_tmp(self, label: str) -> Path:
        path = self._tmp / f"{os.getpid()}-{secrets.token_hex(6)}-{label}"
        path.mkdir(mode=0o700)
        return path

    def _commit(
        self,
        tmp: Path,
        *,
        digest: str,
        kind: BlobKind,
        size: int,
        media_type: str | None,
        owner: str,
    ) -> BlobInfo:
        final = self._path(digest, kind)
        with self._write() as db:
            row = db.execute("SELECT created FROM blobs WHERE digest = ?", (digest,)).fetchone()
            if row is None:
                # A path without a row is left over from a crash between the rename and
                # the commit: it is not visible, so it can be replaced.
                fsutil.remove_tree(final)
                tmp.rename(final)
                db.execute(
                    "INSERT INTO blobs (digest, kind, size, media_type, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (digest, kind.value, size, media_type, time.time()),
                )
            db.execute("INSERT OR IGNORE INTO refs (owner, digest) VALUES (?, ?)", (owner, digest))
            info = _row_info(db.execute(_SELECT_INFO + " WHERE digest = ?", (digest,)).fetchone())
        fsutil.remove_tree(tmp)
        fsutil.fsync_dir(final.parent)
        return info

    # -- writes ------------------------------------------------------------------------

    def _put_file(
        self, src: Path, owner: str, expected: str | None, media_type: str | None, move: bool
    ) -> BlobInfo:
        staging = self._new_tmp("file")
        tmp = staging / "blob"
        try:
            moved = False
            if move:
                with contextlib.suppress(OSError):  # e.g. across filesystems: copy instead
                    src.rename(tmp)
                    moved = True
            if not moved:
                shutil.copyfile(src, tmp)
                if move:
                    src.unlink()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            digest = digests.of_file(tmp)
            if expected is not None and digest != expected:
                raise DigestMismatchError(str(src), expected, digest)
            tmp.chmod(0o444)
            return self._commit(
                tmp,
                digest=digest,
                kind=BlobKind.FILE,
                size=tmp.stat().st_size,
                media_type=media_type,
                owner=owner,
            )
        finally:
            fsutil.remove_tree(staging)

    async def put_file(
        self,
        src: Path,
        *,
        owner: str,
        expected: str | None = None,
        media_type: str | None = None,
        move: bool = False,
    ) -> BlobInfo:
        return await self._run(
            functools.partial(self._put_file, src, owner, expected, media_type, move)
        )

    def _put_tree(self, staging: Path, owner: str) -> BlobInfo:
        if staging.resolve().parent != self._tmp.resolve():
            raise ImageError(f"{staging} is not a staging directory of this store")
        try:
            summary = fsutil.tree_digest(staging)
            fsutil.syncfs(staging)
            return self._commit(
                staging,
                digest=summary.digest,
                kind=BlobKind.TREE,
                size=summary.size,
                media_type=None,
                owner=owner,
            )
        finally:
            fsutil.remove_tree(staging)

    async def put_tree(self, staging: Path, *, owner: str) -> BlobInfo:
        return await self._run(functools.partial(self._put_tree, staging, owner))

    async def new_staging(self, label: str) -> Path:
        return await self._run(functools.partial(self._new_tmp, label))

    # -- reads -------------------------------------------------------------------------

    def _stat(self, digest: str) -> BlobInfo:
        digests.parse_digest(digest)
        with self._connect() as db:
            row = db.execute(_SELECT_INFO + " WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise BlobNotFoundError(digest)
        return _row_info(row)

    async def stat(self, digest: str) -> BlobInfo:
        return await self._run(functools.partial(self._stat, digest))

    async def has(self, digest: str) -> bool:
        try:
            await self.stat(digest)
        except BlobNotFoundError:
            return False
        return True

    async def local_path(self, digest: str) -> Path:
        info = await self.stat(digest)
        return self._path(digest, info.kind)

    def _list(self) -> list[BlobInfo]:
        with self._connect() as db:
            rows = db.execute(_SELECT_INFO + " ORDER BY created").fetchall()
        return [_row_info(r) for r in rows]

    async def list_blobs(self) -> list[BlobInfo]:
        return await self._run(self._list)

    # -- references --------------------------------------------------------------------

    def _set_refs(self, owner: str, wanted: list[str], replace: bool) -> None:
        with self._write() as db:
            for d in wanted:
                if db.execute("SELECT 1 FROM blobs WHERE digest = ?", (d,)).fetchone() is None:
                    raise BlobNotFoundError(d)
            if replace:
                db.execute("DELETE FROM refs WHERE owner = ?", (owner,))
            db.executemany(
                "INSERT OR IGNORE INTO refs (owner, digest) VALUES (?, ?)",
                [(owner, d) for d in wanted],
            )

    async def add_refs(self, owner: str, digests: Iterable[str]) -> None:
        await self._run(functools.partial(self._set_refs, owner, list(digests), False))

    async def set_refs(self, owner: str, digests: Iterable[str]) -> None:
        await self._run(functools.partial(self._set_refs, owner, list(digests), True))

    def _take_if_held(
        self, owner: str | None, wanted: list[str], holder: str, held: list[str]
    ) -> bool:
        with self._write() as db:
            rows = db.execute("SELECT digest FROM refs WHERE owner = ?", (holder,))
            if not {digest for (digest,) in rows}.issuperset(held):
                return False
            if owner is not None:
                db.executemany(
                    "INSERT OR IGNORE INTO refs (owner, digest) VALUES (?, ?)",
                    [(owner, d) for d in wanted],
                )
            return True

    async def take_if_held(
        self, owner: str | None, digests: Iterable[str], *, holder: str, held: Iterable[str]
    ) -> bool:
        take = functools.partial(self._take_if_held, owner, list(digests), holder, list(held))
        return await self._run(take)

    def _column(self, sql: str, arg: str) -> list[str]:
        with self._connect() as db:
            return [r[0] for r in db.execute(sql, (arg,)).fetchall()]

    async def refs(self, owner: str) -> list[str]:
        sql = "SELECT digest FROM refs WHERE owner = ? ORDER BY digest"
        return await self._run(functools.partial(self._column, sql, owner))

    async def owners(self, digest: str) -> list[str]:
        sql = "SELECT owner FROM refs WHERE digest = ? ORDER BY owner"
        return await self._run(functools.partial(self._column, sql, digest))

    def _release(self, owner: str) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM refs WHERE owner = ?", (owner,)).rowcount

    async def release(self, owner: str) -> int:
        return await self._run(functools.partial(self._release, owner))

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[str]:
        owner = f"{LEASE_PREFIX}{os.getpid()}:{secrets.token_hex(8)}"
        try:
            yield owner
        finally:
            with anyio.CancelScope(shield=True):
                await self.release(owner)

    # -- garbage collection ------------------------------------------------------------

    def _gc(self, release: Sequence[str] = ()) -> GcReport:
        removed: list[str] = []
        freed = 0
        stale: list[str] = []
        with self._write() as db:
            db.executemany("DELETE FROM refs WHERE owner = ?", [(o,) for o in release])
            for (owner,) in db.execute(
                "SELECT DISTINCT owner FROM refs WHERE owner LIKE ?", (LEASE_PREFIX + "%",)
            ).fetchall():
                pid = _pid_of(owner.removeprefix(LEASE_PREFIX))
                if pid is not None and not _pid_alive(pid):
                    stale.append(owner)
                    db.execute("DELETE FROM refs WHERE owner = ?", (owner,))
            rows = db.execute(
                "SELECT digest, kind, size FROM blobs b WHERE NOT EXISTS "
                "(SELECT 1 FROM refs r WHERE r.digest = b.digest)"
            ).fetchall()
            for digest, kind, size in rows:
                self._to_trash(self._path(digest, BlobKind(kind)))
                db.execute("DELETE FROM blobs WHERE digest = ?", (digest,))
                removed.append(digest)
                freed += size
            # Paths with no row are leftovers of a crash between rename and commit;
            # holding the write lock means no commit is half-way now.
            known = {r[0] for r in db.execute("SELECT digest FROM blobs").fetchall()}
            for base in (self._files, self._trees):
                for entry in base.iterdir():
                    if f"sha256:{entry.name}" not in known:
                        self._to_trash(entry)
        for entry in self._trash.iterdir():
            fsutil.remove_tree(entry)
        for entry in self._tmp.iterdir():
            pid = _pid_of(entry.name)
            if pid is not None and not _pid_alive(pid):
                fsutil.remove_tree(entry)
        return GcReport(removed=removed, freed_bytes=freed, stale_leases=stale)

    def _to_trash(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.rename(self._trash / f"{path.name}-{secrets.token_hex(4)}")

    async def gc(self, *, release: Sequence[str] = ()) -> GcReport:
        return await self._run(functools.partial(self._gc, tuple(release)))
