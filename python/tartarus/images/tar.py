"""A streaming reader of tar archives (ustar, pax, GNU long names) built for hostile
input: every header field is validated, every size is bounded before anything is
read into memory, and features a container layer never needs (sparse files,
multi-volume archives) are refused instead of half-supported.

Python's `tarfile` reads pax and GNU long-name headers into memory whatever their
declared size, so a single header can exhaust memory; this reader cannot.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import BinaryIO, Protocol, cast

import msgspec
import zstandard

from tartarus.images.errors import HostileArchiveError, InvalidArchiveError

BLOCK = 512
_HIGH_BYTES = bytes(range(128, 256))
GiB = 1 << 30


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class EntryType(StrEnum):
    FILE = "file"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    DIR = "dir"
    FIFO = "fifo"


_TYPES = {
    b"0": EntryType.FILE,
    b"\0": EntryType.FILE,
    b"7": EntryType.FILE,  # contiguous file: a regular file everywhere that matters
    b"1": EntryType.HARDLINK,
    b"2": EntryType.SYMLINK,
    b"3": EntryType.CHAR,
    b"4": EntryType.BLOCK,
    b"5": EntryType.DIR,
    b"6": EntryType.FIFO,
}


class TarLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds that turn an archive bomb into a clear error instead of a full disk."""

    max_member_bytes: int = 16 * GiB
    max_total_bytes: int = 64 * GiB
    max_entries: int = 2_000_000
    # pax extended headers and GNU long names are held in memory: keep them small.
    max_header_bytes: int = 1 << 20


class TarEntry(msgspec.Struct, kw_only=True):
    name: str
    type: EntryType
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    # Offset of the entry's data from the start of the (uncompressed) stream.
    offset: int = 0


class _Meta:
    """Headers that describe the next entry: pax records and GNU long names."""

    def __init__(self) -> None:
        self.pax: dict[str, str] = {}
        self.long_name: str | None = None
        self.long_link: str | None = None


def _str(raw: bytes) -> str:
    return os.fsdecode(raw.split(b"\0", 1)[0])


class TarReader:
    """Iterates the entries of a tar stream. Data of the current entry is read with
    `read_data()`; whatever is left unread is skipped when iteration moves on."""

    def __init__(
        self,
        stream: Readable,
        archive: str,
        limits: TarLimits | None = None,
        *,
        seek: Callable[[int], object] | None = None,
    ) -> None:
        self._stream = stream
        # For a seekable file: skip unread data by seeking (relative) instead of reading.
        self._seek = seek
        self.archive = archive
        self.limits = limits or TarLimits()
        self.position = 0
        self.entries = 0
        self.data_bytes = 0
        self._remaining = 0  # unread data bytes of the current entry, padding included
        self._data_left = 0  # unread data bytes of the current entry
        self._globals: dict[str, str] = {}

    # -- low level ---------------------------------------------------------------------

    def _read_exact(self, n: int) -> bytes:
        chunks = []
        left = n
        while left:
            chunk = self._stream.read(min(left, 1 << 20))
            if not chunk:
                raise InvalidArchiveError(
                    f"{self.archive}: truncated archive (ended at byte {self.position})"
                )
            chunks.append(chunk)
            left -= len(chunk)
            self.position += len(chunk)
        return b"".join(chunks)

    def _skip(self, n: int) -> None:
        if self._seek is not None and n:
            self._seek(n)
            self.position += n
            return
        while n:
            step = min(n, 1 << 20)
            self._read_exact(step)
            n -= step

    def _bad(self, problem: str) -> InvalidArchiveError:
        return InvalidArchiveError(f"{self.archive}: {problem} (at byte {self.position})")

    def _number(self, field: bytes, what: str) -> int:
        if field and field[0] & 0x80:
            # GNU base-256: big-endian, high bit of the first byte set; negative is 0xff.
            if field[0] == 0xFF:
                raise self._bad(f"negative {what} in header")
            return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        text = field.split(b"\0", 1)[0].strip(b" ")
        if not text:
            return 0
        try:
            return int(text, 8)
        except ValueError:
            raise self._bad(f"{what} field {field!r} is not an octal number") from None

    @staticmethod
    def _padded(size: int) -> int:
        return (size + BLOCK - 1) // BLOCK * BLOCK

    def _read_header_payload(self, size: int, kind: str) -> bytes:
        if size > self.limits.max_header_bytes:
            raise HostileArchiveError(
                self.archive,
                kind,
                f"{kind} header of {size} bytes exceeds the {self.limits.max_header_bytes} "
                "byte limit",
            )
        data = self._read_exact(self._padded(size))
        return data[:size]

    def _parse_pax(self, data: bytes) -> dict[str, str]:
        records: dict[str, str] = {}
        pos = 0
        while pos < len(data):
            if data[pos:].strip(b"\0") == b"":
                break
            space = data.find(b" ", pos)
            if space < 0 or space - pos > 20:
                raise self._bad("malformed pax record length")
            try:
                length = int(data[pos:space])
            except ValueError:
                raise self._bad("malformed pax record length") from None
            end = pos + length
            if length < 5 or end > len(data) or data[end - 1 : end] != b"\n":
                raise self._bad("malformed pax record")
            record = data[space + 1 : end - 1]
            key, sep, value = record.partition(b"=")
            if not sep:
                raise self._bad("pax record without '='")
            records[key.decode("utf-8", "surrogateescape")] = value.decode(
                "utf-8", "surrogateescape"
            )
            pos = end
        return records

    # -- entries -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[TarEntry]:
        meta = _Meta()
        while True:
            self._skip(self._remaining)
            self._remaining = self._data_left = 0
            header = self._stream.read(BLOCK)
            if not header:
                # No end-of-archive blocks: tolerated (some writers omit them).
                return
            self.position += len(header)
            if len(header) < BLOCK:
                header += self._read_exact(BLOCK - len(header))
            if header == bytes(BLOCK):
                return
            self._check_checksum(header)
            typeflag = header[156:157]
            size = self._number(header[124:136], "size")
            if self._read_meta(typeflag, size, meta):
                continue
            if typeflag == b"S" or any(k.startswith("GNU.sparse") for k in meta.pax):
                raise self._bad("GNU sparse files are not supported")
            kind = _TYPES.get(typeflag)
            if kind is None:
                raise self._bad(f"unsupported tar entry type {typeflag!r}")
            entry = self._entry(header, kind=kind, size=size, meta=meta)
            meta = _Meta()
            self._account(entry)
            entry.offset = self.position
            self._data_left = entry.size
            self._remaining = self._padded(entry.size)
            yield entry

    def _read_meta(self, typeflag: bytes, size: int, meta: _Meta) -> bool:
        """Reads a pax or GNU long-name header into `meta`; False for other types."""
        if typeflag in (b"x", b"g"):
            records = self._parse_pax(self._read_header_payload(size, "pax"))
            (self._globals if typeflag == b"g" else meta.pax).update(records)
            return True
        if typeflag == b"L":
            meta.long_name = _str(self._read_header_payload(size, "GNU long name"))
            return True
        if typeflag == b"K":
            meta.long_link = _str(self._read_header_payload(size, "GNU long link"))
            return True
        return False

    def _account(self, entry: TarEntry) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise HostileArchiveError(
                self.archive, entry.name, f"more than {self.limits.max_entries} entries"
            )
        if entry.size > self.limits.max_member_bytes:
            raise HostileArchiveError(
                self.archive,
                entry.name,
                f"declared size {entry.size} exceeds the {self.limits.max_member_bytes} "
                "byte limit per file",
            )
        self.data_bytes += entry.size
        if self.data_bytes > self.limits.max_total_bytes:
            raise HostileArchiveError(
                self.archive,
                entry.name,
                f"archive content exceeds the {self.limits.max_total_bytes} byte limit",
            )

    def _check_checksum(self, header: bytes) -> None:
        stored = self._number(header[148:156], "checksum")
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if stored == unsigned:
            return
        # Some old writers summed signed bytes.
        outside = header[:148] + header[156:]
        signed = unsigned - 256 * (len(outside) - len(outside.translate(None, _HIGH_BYTES)))
        if stored != signed:
            raise self._bad("bad header checksum (not a tar archive, or corrupt)")

    def _entry(self, header: bytes, *, kind: EntryType, size: int, meta: _Meta) -> TarEntry:
        pax = {**self._globals, **meta.pax}
        magic = header[257:263]
        name = _str(header[0:100])
        if magic == b"ustar\0":
            prefix = _str(header[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        name = pax.get("path", meta.long_name if meta.long_name is not None else name)
        linkname = pax.get(
            "linkpath", meta.long_link if meta.long_link is not None else _str(header[157:257])
        )

        def pax_int(key: str, default: int) -> int:
            if key not in pax:
                return default
            try:
                value = int(pax[key])
            except ValueError:
                raise self._bad(f"pax {key} {pax[key]!r} is not an integer") from None
            if value < 0:
                raise self._bad(f"negative pax {key}")
            return value

        if "size" in pax:
            size = pax_int("size", size)
        if kind is not EntryType.FILE:
            size = 0  # only regular files carry data
        mtime: float = self._number(header[136:148], "mtime")
        if "mtime" in pax:
            try:
                mtime = float(pax["mtime"])
            except ValueError:
                raise self._bad(f"pax mtime {pax['mtime']!r} is not a number") from None
        return TarEntry(
            name=name,
            type=kind,
            mode=self._number(header[100:108], "mode") & 0o7777,
            uid=pax_int("uid", self._number(header[108:116], "uid")),
            gid=pax_int("gid", self._number(header[116:124], "gid")),
            size=size,
            mtime=mtime,
            linkname=linkname,
            devmajor=self._number(header[329:337], "devmajor") if magic[:5] == b"ustar" else 0,
            devminor=self._number(header[337:345], "devminor") if magic[:5] == b"ustar" else 0,
        )

    def read_data(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Yields the current entry's data in chunks."""
        while self._data_left:
            n = min(chunk_size, self._data_left)
            chunk = self._read_exact(n)
            self._data_left -= n
            self._remaining -= n
            yield chunk


_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
    b"\x28\xb5\x2f\xfd": "zstd",
}


def sniff_compression(head: bytes) -> str | None:
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


class _Prepended:
    """A stream with bytes already read from it put back in front."""

    def __init__(self, head: bytes, rest: Readable) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._rest.read(n)


def open_decompressed(stream: Readable, archive: str) -> Readable:
    """Wraps `stream` in the decompressor its magic bytes name; plain tar passes
    through."""
    head = stream.read(6)
    kind = sniff_compression(head)
    prepended = _Prepended(head, stream)
    # The decompressors only call read(); their stubs ask for a whole file object.
    raw = cast("BinaryIO", prepended)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(raw)
    if kind == "bzip2":
        return bz2.BZ2File(raw)
    if kind == "zstd":
        reader: Readable = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader
    return prepended
