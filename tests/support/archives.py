"""Builds tar archives for the image tests, hostile ones included.

`tarfile` writes whatever names and types it is given, which is exactly what a
hostile layer needs; `raw_header` forges what tarfile refuses to write.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass


@dataclass
class Member:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    return Member(name, tarfile.REGTYPE, data, mode=mode)


def directory(name: str, mode: int = 0o755) -> Member:
    return Member(name, tarfile.DIRTYPE, mode=mode)


def symlink(name: str, target: str) -> Member:
    return Member(name, tarfile.SYMTYPE, linkname=target, mode=0o777)


def hardlink(name: str, target: str) -> Member:
    return Member(name, tarfile.LNKTYPE, linkname=target)


def make_tar(members: list[Member], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.mode = m.mode
            info.uid, info.gid = m.uid, m.gid
            info.linkname = m.linkname
            info.mtime = 1_700_000_000
            if m.kind == tarfile.REGTYPE:
                info.size = len(m.data)
                tar.addfile(info, io.BytesIO(m.data))
            else:
                if m.kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    info.devmajor, info.devminor = 1, 3
                tar.addfile(info)
    return buf.getvalue()


def make_tgz(members: list[Member]) -> bytes:
    return gzip.compress(make_tar(members), compresslevel=1, mtime=0)


def raw_header(name: bytes, *, size: int, typeflag: bytes = b"0") -> bytes:
    """A ustar header with any declared size (no data follows)."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = f"{size:011o}\0".encode()
    header[136:148] = b"00000000000\0"
    header[156:157] = typeflag
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)
