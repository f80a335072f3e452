"""The streaming tar reader: agrees with tarfile on well-formed archives, and fails
only with ImageError (never a crash or an unbounded read) on anything else."""

from __future__ import annotations

import contextlib
import io
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tartarus.images.errors import HostileArchiveError, ImageError, InvalidArchiveError
from tartarus.images.tar import EntryType, TarLimits, TarReader
from tests.support.archives import Member, directory, file, hardlink, make_tar, raw_header, symlink

_name_char = st.characters(
    codec="utf-8", exclude_characters="/\0", categories=["L", "N", "P", "S", "Zs"], min_codepoint=32
)
_component = st.text(_name_char, min_size=1, max_size=40).filter(lambda c: c not in (".", ".."))
_name = st.lists(_component, min_size=1, max_size=6).map("/".join)


@st.composite
def members(draw: st.DrawFn) -> list[Member]:
    out = []
    for name in draw(st.lists(_name, min_size=1, max_size=8, unique=True)):
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink"]))
        if kind == "file":
            out.append(file(name, draw(st.binary(max_size=3000)), draw(st.integers(0, 0o7777))))
        elif kind == "dir":
            out.append(directory(name))
        elif kind == "symlink":
            out.append(symlink(name, draw(_name)))
        else:
            out.append(hardlink(name, draw(_name)))
    return out


Row = tuple[str, EntryType, int, int, str, bytes]


def read_all(data: bytes, limits: TarLimits | None = None) -> list[Row]:
    reader = TarReader(io.BytesIO(data), "test.tar", limits)
    out = []
    for e in reader:
        body = b"".join(reader.read_data(chunk_size=7))
        out.append((e.name.rstrip("/"), e.type, e.mode, e.size, e.linkname, body))
    return out


@given(members(), st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_reader_agrees_with_tarfile(ms: list[Member], fmt: int) -> None:
    data = make_tar(ms, fmt=fmt)
    ours = read_all(data)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        theirs: list[Row] = []
        for t in tar.getmembers():
            f = tar.extractfile(t) if t.isreg() else None
            kind = {
                tarfile.REGTYPE: EntryType.FILE,
                tarfile.DIRTYPE: EntryType.DIR,
                tarfile.SYMTYPE: EntryType.SYMLINK,
                tarfile.LNKTYPE: EntryType.HARDLINK,
            }[t.type]
            body = f.read() if f else b""
            theirs.append((t.name, kind, t.mode, t.size if t.isreg() else 0, t.linkname, body))
    assert ours == theirs


@given(st.binary(max_size=4096))
@settings(max_examples=300)
def test_garbage_fails_cleanly(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        read_all(data, TarLimits(max_total_bytes=1 << 20, max_header_bytes=4096))


@given(members(), st.data())
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_corrupted_archives_fail_cleanly(ms: list[Member], data: st.DataObject) -> None:
    raw = bytearray(make_tar(ms))
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    with contextlib.suppress(ImageError):
        read_all(bytes(raw[:cut]), TarLimits(max_total_bytes=1 << 20, max_header_bytes=4096))


def test_long_names_and_large_numbers() -> None:
    name = "d/" * 80 + "file"
    data = make_tar([Member(name, data=b"x", uid=3_000_000, gid=7)], fmt=tarfile.GNU_FORMAT)
    [(got, _, _, size, _, body)] = read_all(data)
    assert (got, size, body) == (name, 1, b"x")


def test_declared_size_over_limit_is_rejected_before_reading() -> None:
    data = raw_header(b"huge", size=1 << 40)
    with pytest.raises(HostileArchiveError, match="exceeds"):
        read_all(data, TarLimits(max_member_bytes=1 << 30))


def test_pax_header_bomb_is_rejected() -> None:
    data = raw_header(b"pax", size=100 << 20, typeflag=b"x")
    with pytest.raises(HostileArchiveError, match="pax header"):
        read_all(data)


def test_truncated_archive_is_an_error() -> None:
    data = make_tar([file("a", b"x" * 5000)])
    with pytest.raises(InvalidArchiveError, match="truncated"):
        read_all(data[:1500])


def test_sparse_files_are_refused() -> None:
    with pytest.raises(InvalidArchiveError, match="sparse"):
        read_all(raw_header(b"s", size=0, typeflag=b"S"))


def test_too_many_entries() -> None:
    data = make_tar([file(f"f{i}") for i in range(20)])
    with pytest.raises(HostileArchiveError, match="more than 10 entries"):
        read_all(data, TarLimits(max_entries=10))
