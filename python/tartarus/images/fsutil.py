"""Filesystem helpers for the store and the builders: durable atomic writes, tree
digests, hardlink copies and removal of trees that may hold read-only directories."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import msgspec

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flushes the whole filesystem holding `path` (one call instead of an fsync per
    file when a tree of thousands of files is committed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Writes `data` to `path` so readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per call: tasks and threads of one process may write the same
    # path at once (a pid-named temp file would be renamed away under one of them).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


_ExcInfo = tuple[type[BaseException], BaseException, object]


def remove_tree(path: Path) -> None:
    """Removes a file or directory tree, including read-only directories; missing is
    fine, and so is another remover of the same tree (two gcs sweeping one trash)."""

    def gone_is_fine(func: object, failed: str, exc: _ExcInfo) -> None:
        if not isinstance(exc[1], FileNotFoundError):
            raise exc[1]

    def make_writable_and_retry(func: object, failed: str, exc: _ExcInfo) -> None:
        if isinstance(exc[1], FileNotFoundError):
            return
        path = Path(failed)
        with contextlib.suppress(FileNotFoundError):
            path.parent.chmod(stat.S_IRWXU)
            if path.is_dir() and not path.is_symlink():
                path.chmod(stat.S_IRWXU)
                shutil.rmtree(path, onerror=gone_is_fine)
            else:
                path.unlink()

    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, onerror=make_writable_and_retry)
    else:
        path.unlink(missing_ok=True)


def walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Yields (relative path, lstat) for every entry under `root`, sorted, never
    following symlinks. The root itself comes first as ''."""
    yield "", root.lstat()
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        dirs = []
        for entry in entries:
            child = f"{rel}/{entry.name}" if rel else entry.name
            st = entry.stat(follow_symlinks=False)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                dirs.append(child)
        stack.extend(reversed(dirs))


class TreeSummary(msgspec.Struct, frozen=True, kw_only=True):
    digest: str
    size: int
    files: int


def tree_digest(root: Path) -> TreeSummary:
    """Content digest of a directory tree: paths, types, modes, owners, file contents
    and link targets, in a canonical order. Timestamps are left out, so the same
    content built twice has the same digest."""
    h = hashlib.sha256()
    size = 0
    files = 0
    for rel, st in walk(root):
        mode = stat.S_IMODE(st.st_mode)
        kind = stat.S_IFMT(st.st_mode)
        if stat.S_ISREG(kind):
            with (root / rel).open("rb") as f:
                payload = hashlib.file_digest(f, "sha256").hexdigest()
            size += st.st_size
            files += 1
        elif stat.S_ISLNK(kind):
            # Path.readlink() would normalise the target (drop a trailing '/').
            payload = os.readlink(root / rel)  # noqa: PTH115
        elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
            payload = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        else:
            payload = ""
        line = f"{rel}\0{kind:o}\0{mode:o}\0{st.st_uid}\0{st.st_gid}\0{payload}\n"
        h.update(os.fsencode(line))
    return TreeSummary(digest=f"sha256:{h.hexdigest()}", size=size, files=files)


def hardlink_copy(src: Path, dst: Path) -> None:
    """Recreates `src` at `dst` with the same directories and hardlinks to every other
    entry: instant and free of extra disk, valid because stored trees never change."""
    for rel, st in walk(src):
        target = dst / rel if rel else dst
        if stat.S_ISDIR(st.st_mode):
            target.mkdir(mode=0o700, exist_ok=not rel)
        else:
            os.link(src / rel, target, follow_symlinks=False)
    # Directory modes last: a read-only directory must still receive its children.
    for rel, st in walk(src):
        if stat.S_ISDIR(st.st_mode):
            target = dst / rel if rel else dst
            if os.geteuid() == 0:
                os.chown(target, st.st_uid, st.st_gid)
            target.chmod(stat.S_IMODE(st.st_mode))


def disk_usage(root: Path) -> int:
    """Bytes of regular files under `root` (apparent size)."""
    return sum(st.st_size for _, st in walk(root) if stat.S_ISREG(st.st_mode))


LOCK_POLL_S = 0.2


@contextlib.asynccontextmanager
async def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """An exclusive lock on `path` across processes (and across tasks of one process:
    each holder opens the file itself). Polled, so waiting is cancellable; the kernel
    releases it if the holder dies. `on_wait` is called once if another holds it."""
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                await anyio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock
