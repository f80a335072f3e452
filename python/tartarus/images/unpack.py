"""Unpacks image layers and package archives into a staging root, safely.

Every operation is relative to a directory file descriptor and refuses to follow a
symlink in the final component, so nothing is ever written outside the root. Symlinks
met in *parent* components are resolved inside the root, as a chroot would (Debian's
`/bin -> usr/bin` must keep working); a `..` at the root stays at the root.

Rejected with `HostileArchiveError`: absolute member names, `..` components, symlinks
whose relative target climbs out of the root, hardlinks to absolute or `..` paths,
device nodes, and sizes over the limits in `TarLimits`.

OCI layer semantics: `.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` makes
its directory opaque (lower layers' children disappear); neither removes what the same
layer adds, whatever the order of members in the archive.
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import zlib
from collections.abc import Callable

import msgspec
import zstandard

from tartarus.errors import is_disk_full
from tartarus.images.errors import (
    DiskFullError,
    HostileArchiveError,
    ImageError,
    InvalidArchiveError,
)
from tartarus.images.tar import EntryType, Readable, TarEntry, TarLimits, TarReader

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 40

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackStats(msgspec.Struct, kw_only=True):
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0


def split_member_name(archive: str, name: str) -> list[str]:
    """Validates an archive member name and returns its components ([] for the root)."""
    if "\0" in name:
        raise HostileArchiveError(archive, name, "NUL byte in name")
    if name.startswith("/"):
        raise HostileArchiveError(archive, name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise HostileArchiveError(archive, name, "'..' in path")
    return parts


def symlink_escapes(location: list[str], target: str) -> bool:
    """True if a relative symlink at `location` (its resolved parent components) climbs
    above the root. Absolute targets are resolved inside the sandbox's root and cannot."""
    if target.startswith("/"):
        return False
    depth = len(location)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        else:
            depth += 1
    return False


class _Unpacker:
    def __init__(self, root: str, archive: str, whiteouts: bool, chown: bool) -> None:
        self.archive = archive
        self.whiteouts = whiteouts
        self.chown = chown
        self.root_fd = os.open(root, _DIR_FLAGS)
        # Resolved paths this archive created or passed through: whiteouts and opaque
        # markers apply to lower layers only.
        self.touched: set[str] = set()
        self.dir_modes: list[tuple[list[str], TarEntry]] = []
        self.stats = UnpackStats()
        self._parent: tuple[tuple[str, ...], int, list[str]] | None = None

    def close(self) -> None:
        self.forget_parent()
        os.close(self.root_fd)

    # -- path resolution inside the root -----------------------------------------------

    def open_dir(self, member: str, comps: list[str], *, create: bool) -> tuple[int, list[str]]:
        """Opens the directory `comps` (following symlinks inside the root, creating
        missing directories if `create`); returns its fd and its real components."""
        stack: list[str] = []
        fds = [os.dup(self.root_fd)]
        todo = list(reversed(comps))
        hops = 0
        try:
            while todo:
                name = todo.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if stack:
                        stack.pop()
                        os.close(fds.pop())
                    continue
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=fds[-1])
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fds[-1])
                    fd = os.open(name, _DIR_FLAGS, dir_fd=fds[-1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    hops += 1
                    target = self.follow(member, fds[-1], name, [*stack, name], hops)
                    if target.startswith("/"):
                        while len(fds) > 1:
                            os.close(fds.pop())
                        stack.clear()
                    todo.extend(reversed(target.split("/")))
                    continue
                stack.append(name)
                fds.append(fd)
                self.touched.add("/".join(stack))
            return fds.pop(), stack
        finally:
            for fd in fds:
                os.close(fd)

    def follow(self, member: str, dir_fd: int, name: str, path: list[str], hops: int) -> str:
        """The target of the symlink `name` met while resolving a parent directory."""
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise InvalidArchiveError(
                f"{self.archive}: {member}: {'/'.join(path)} is not a directory"
            )
        if hops > MAX_SYMLINK_HOPS:
            raise HostileArchiveError(self.archive, member, "too many levels of symbolic links")
        return os.readlink(name, dir_fd=dir_fd)

    # -- removal -----------------------------------------------------------------------

    def parent(self, member: str, comps: list[str]) -> tuple[int, list[str]]:
        """`open_dir(comps, create=True)`, remembering the last parent: members of one
        directory usually come together. The caller closes the returned fd."""
        key = tuple(comps)
        if self._parent is None or self._parent[0] != key:
            self.forget_parent()
            fd, real = self.open_dir(member, comps, create=True)
            self._parent = (key, fd, real)
        _, fd, real = self._parent
        return os.dup(fd), real

    def forget_parent(self) -> None:
        """Called before anything is removed: the remembered directory may go."""
        if self._parent is not None:
            os.close(self._parent[1])
            self._parent = None

    def remove_entry(self, parent_fd: int, name: str) -> None:
        self.forget_parent()
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def prune(self, dir_fd: int, path: list[str]) -> None:
        """Removes every child of the directory not touched by this archive."""
        for name in os.listdir(dir_fd):
            child = "/".join([*path, name])
            if child not in self.touched:
                self.remove_entry(dir_fd, name)
                continue
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    self.prune(fd, [*path, name])
                finally:
                    os.close(fd)

    def whiteout(self, member: str, parent: list[str], leaf: str) -> None:
        self.stats.whiteouts += 1
        try:
            fd, real = self.open_dir(member, parent, create=leaf == OPAQUE)
        except FileNotFoundError:
            return  # nothing below to hide
        try:
            if leaf == OPAQUE:
                self.prune(fd, real)
                return
            if leaf.startswith(WHITEOUT_PREFIX * 2):
                return  # other aufs metadata (.wh..wh.plnk): not content
            target = leaf.removeprefix(WHITEOUT_PREFIX)
            if target in ("", ".", ".."):
                raise HostileArchiveError(self.archive, member, "whiteout of an invalid name")
            if "/".join([*real, target]) not in self.touched:
                self.remove_entry(fd, target)
        finally:
            os.close(fd)

    # -- creation ----------------------------------------------------------------------

    def entry(self, reader: TarReader, entry: TarEntry) -> None:
        comps = split_member_name(self.archive, entry.name)
        if not comps:
            return  # the root itself: its mode belongs to us
        parent, leaf = comps[:-1], comps[-1]
        if self.whiteouts and leaf.startswith(WHITEOUT_PREFIX):
            self.whiteout(entry.name, parent, leaf)
            return
        if entry.type in (EntryType.CHAR, EntryType.BLOCK):
            raise HostileArchiveError(self.archive, entry.name, "device node")
        fd, real = self.parent(entry.name, parent)
        try:
            self.create(reader, entry, fd, real, leaf)
        finally:
            os.close(fd)
        self.touched.add("/".join([*real, leaf]))
        self.stats.entries += 1

    def create(
        self, reader: TarReader, entry: TarEntry, fd: int, real: list[str], leaf: str
    ) -> None:
        try:
            existing = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if entry.type is EntryType.DIR:
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    self.forget_parent()
                    os.unlink(leaf, dir_fd=fd)
                os.mkdir(leaf, 0o700, dir_fd=fd)
            # Modes last: a read-only directory must still receive its children.
            self.dir_modes.append(([*real, leaf], entry))
            return
        if entry.type is EntryType.HARDLINK:
            self.hardlink(entry, fd, real, leaf)
            return
        if existing is not None:
            self.remove_entry(fd, leaf)
        if entry.type is EntryType.FILE:
            self.write_file(reader, entry, fd, leaf)
        elif entry.type is EntryType.SYMLINK:
            self.symlink(entry, fd, real, leaf)
        elif entry.type is EntryType.FIFO:
            os.mkfifo(leaf, 0o600, dir_fd=fd)
            self.apply_owner_mode(fd, leaf, entry)

    def symlink(self, entry: TarEntry, fd: int, real: list[str], leaf: str) -> None:
        if not entry.linkname:
            raise InvalidArchiveError(f"{self.archive}: {entry.name}: empty symlink target")
        if "\0" in entry.linkname:
            raise HostileArchiveError(self.archive, entry.name, "NUL byte in link target")
        if symlink_escapes(real, entry.linkname):
            raise HostileArchiveError(
                self.archive, entry.name, f"symlink to {entry.linkname!r} points outside the root"
            )
        os.symlink(entry.linkname, leaf, dir_fd=fd)
        if self.chown:
            os.chown(leaf, entry.uid, entry.gid, dir_fd=fd, follow_symlinks=False)

    def hardlink(self, entry: TarEntry, fd: int, real: list[str], leaf: str) -> None:
        # Resolve the target before removing anything: a link to itself is a no-op.
        target = self.link_target(entry)
        if target == [*real, leaf]:
            return
        src_fd, src_leaf = self.link_source(entry, target)
        try:
            self.remove_entry(fd, leaf)
            os.link(src_leaf, leaf, src_dir_fd=src_fd, dst_dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(src_fd)

    def link_target(self, entry: TarEntry) -> list[str]:
        target = entry.linkname
        if target.startswith("/"):
            raise HostileArchiveError(self.archive, entry.name, f"hardlink to absolute {target!r}")
        if ".." in target.split("/"):
            raise HostileArchiveError(self.archive, entry.name, f"'..' in hardlink {target!r}")
        comps = split_member_name(self.archive, target)
        if not comps:
            raise HostileArchiveError(self.archive, entry.name, "hardlink to the root")
        return comps

    def link_source(self, entry: TarEntry, comps: list[str]) -> tuple[int, str]:
        target = entry.linkname
        try:
            fd, _ = self.open_dir(entry.name, comps[:-1], create=False)
        except FileNotFoundError:
            raise InvalidArchiveError(
                f"{self.archive}: {entry.name}: hardlink target {target!r} does not exist"
            ) from None
        try:
            st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            os.close(fd)
            raise InvalidArchiveError(
                f"{self.archive}: {entry.name}: hardlink target {target!r} does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            os.close(fd)
            raise HostileArchiveError(self.archive, entry.name, "hardlink to a directory")
        return fd, comps[-1]

    def write_file(self, reader: TarReader, entry: TarEntry, dir_fd: int, leaf: str) -> None:
        out = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=dir_fd)
        try:
            for chunk in reader.read_data():
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view) :]
            self.stats.bytes += entry.size
            if self.chown:
                os.fchown(out, entry.uid, entry.gid)
            # After chown, which clears set-id bits.
            os.fchmod(out, entry.mode)
            os.utime(out, (entry.mtime, entry.mtime))
        finally:
            os.close(out)

    def apply_owner_mode(self, dir_fd: int, leaf: str, entry: TarEntry) -> None:
        if self.chown:
            os.chown(leaf, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.chmod(leaf, entry.mode, dir_fd=dir_fd, follow_symlinks=False)

    def finish(self) -> None:
        for comps, entry in reversed(self.dir_modes):
            try:
                fd, _ = self.open_dir(entry.name, comps[:-1], create=False)
            except (FileNotFoundError, InvalidArchiveError):
                continue  # removed or replaced later in this archive
            try:
                st = os.stat(comps[-1], dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    self.apply_owner_mode(fd, comps[-1], entry)
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)


def unpack(
    stream: Readable,
    root: str,
    *,
    archive: str,
    limits: TarLimits | None = None,
    whiteouts: bool = True,
    chown: bool | None = None,
    on_entry: Callable[[TarReader], None] | None = None,
) -> UnpackStats:
    """Unpacks the tar `stream` into the existing directory `root`.

    `whiteouts`: apply OCI whiteout files (image layers); off for plain archives.
    `chown`: restore owners (default: when running as root).
    `on_entry`: called after each member, e.g. to report progress.
    """
    reader = TarReader(stream, archive, limits)
    unpacker = _Unpacker(root, archive, whiteouts, os.geteuid() == 0 if chown is None else chown)
    member = ""
    try:
        for entry in reader:
            member = entry.name
            unpacker.entry(reader, entry)
            if on_entry is not None:
                on_entry(reader)
        unpacker.finish()
        # Read on to the end of the compressed stream (bounded) so its checksum is
        # verified; trailing data beyond the bound is never decompressed.
        for _ in range(16):
            if not stream.read(1 << 16):
                break
    except ImageError:
        raise
    except (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
        if is_disk_full(e):
            raise DiskFullError(f"unpacking {archive}", root) from e
        # EOFError / ValueError come from truncated or corrupt compressed streams.
        raise InvalidArchiveError(f"{archive}: cannot unpack {member!r}: {e}") from e
    finally:
        unpacker.close()
    return unpacker.stats
