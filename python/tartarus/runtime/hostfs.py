"""A sandbox's files kept in a host directory (the wasm backend's pre-opened directory).

Every path is a sandbox path (`/data/x.txt`) resolved under the root one component at
a time with `O_NOFOLLOW`, so neither `..` nor a symlink planted by the sandboxed
program reaches outside the root.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat as stat_mod
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import anyio

from tartarus.runtime.base import SandboxError
from tartarus.runtime.types import FileInfo, FileKind

CHUNK: Final = 1 << 20
# read_file refuses files larger than this; download() streams them.
READ_LIMIT: Final = 64 << 20


class HostFileError(SandboxError):
    """A file operation failed; says which path and why."""


def _components(path: str) -> list[str]:
    if not path.startswith("/"):
        raise HostFileError(f"{path!r}: sandbox paths are absolute")
    if "\0" in path:
        raise HostFileError(f"{path!r}: NUL byte in path")
    normal = posixpath.normpath(path)
    return [c for c in normal.split("/") if c]


class HostDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def _parent(self, path: str) -> Iterator[tuple[int, str]]:
        """Yields (fd of the parent directory, final name) for `path`."""
        parts = _components(path)
        if not parts:
            raise HostFileError(f"{path!r} names the root directory itself")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as e:
                    raise HostFileError(f"{path}: {part}: {e.strerror}") from e
                os.close(fd)
                fd = nxt
            yield fd, parts[-1]
        finally:
            os.close(fd)

    def _open_dir(self, path: str) -> int:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        for part in _components(path):
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                os.close(fd)
                raise HostFileError(f"{path}: {part}: {e.strerror}") from e
            os.close(fd)
            fd = nxt
        return fd

    def _open_file(self, path: str) -> int:
        with self._parent(path) as (dfd, name):
            try:
                return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as e:
                raise HostFileError(f"{path}: {e.strerror}") from e

    def read_file(self, path: str, max_bytes: int = READ_LIMIT) -> bytes:
        fd = self._open_file(path)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise HostFileError(f"{path} is {size} bytes, over {max_bytes}: use download()")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HostFileError(f"{path} grew past {max_bytes} bytes while being read")
        return data

    async def download(self, path: str) -> AsyncIterator[bytes]:
        fd = self._open_file(path)
        async with await anyio.open_file(fd, "rb") as f:
            while chunk := await f.read(CHUNK):
                yield chunk

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        """Writes to a temporary file beside `path`, then renames it over `path`."""
        with self._parent(path) as (dfd, name):
            tmp = f".{name}.tartarus-{uuid.uuid4().hex[:8]}"
            try:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(tmp, flags, mode, dir_fd=dfd)
            except OSError as e:
                raise HostFileError(f"{path}: {e.strerror}") from e
            written = 0
            try:
                os.fchmod(fd, mode)  # O_CREAT's mode passes through the umask
                async with await anyio.open_file(fd, "wb") as f:
                    async for chunk in chunks:
                        await f.write(chunk)
                        written += len(chunk)
                os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        return written

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.upload(path, one(), mode=mode)

    def _info(self, path: str, st: os.stat_result) -> FileInfo:
        if stat_mod.S_ISREG(st.st_mode):
            kind = FileKind.FILE
        elif stat_mod.S_ISDIR(st.st_mode):
            kind = FileKind.DIR
        elif stat_mod.S_ISLNK(st.st_mode):
            kind = FileKind.SYMLINK
        else:
            kind = FileKind.OTHER
        return FileInfo(
            path=path,
            name=posixpath.basename(path) or "/",
            kind=kind,
            size=st.st_size,
            mode=stat_mod.S_IMODE(st.st_mode),
            mtime=st.st_mtime,
        )

    def stat(self, path: str) -> FileInfo:
        if not _components(path):
            return self._info("/", self.root.stat())
        with self._parent(path) as (dfd, name):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                raise HostFileError(f"{path}: {e.strerror}") from e
        return self._info(posixpath.normpath(path), st)

    def list_dir(self, path: str) -> list[FileInfo]:
        fd = self._open_dir(path)
        try:
            base = posixpath.normpath(path)
            out = []
            for name in sorted(os.listdir(fd)):  # noqa: PTH208 - by fd, never by path
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                out.append(self._info(posixpath.join(base, name), st))
            return out
        finally:
            os.close(fd)

    def make_dir(self, path: str, *, parents: bool = True) -> None:
        parts = _components(path)
        for i in range(1 if parents else len(parts), len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            with self._parent(sub) as (dfd, name):
                try:
                    os.mkdir(name, 0o755, dir_fd=dfd)
                except FileExistsError:
                    if i == len(parts) and not parents:
                        raise HostFileError(f"{path} already exists") from None
                except OSError as e:
                    raise HostFileError(f"{sub}: {e.strerror}") from e

    def remove(self, path: str, *, recursive: bool = False) -> None:
        with self._parent(path) as (dfd, name):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if stat_mod.S_ISDIR(st.st_mode):
                    if recursive:
                        self._remove_tree(dfd, name)
                    else:
                        os.rmdir(name, dir_fd=dfd)
                else:
                    os.unlink(name, dir_fd=dfd)
            except OSError as e:
                raise HostFileError(f"{path}: {e.strerror}") from e

    def _remove_tree(self, dfd: int, name: str) -> None:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            for entry in os.listdir(fd):  # noqa: PTH208 - by fd, never by path
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat_mod.S_ISDIR(st.st_mode):
                    self._remove_tree(fd, entry)
                else:
                    os.unlink(entry, dir_fd=fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dfd)

    def rename(self, src: str, dst: str) -> None:
        with self._parent(src) as (sfd, sname), self._parent(dst) as (dfd, dname):
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            except OSError as e:
                raise HostFileError(f"{src} -> {dst}: {e.strerror}") from e
