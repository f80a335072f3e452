"""HostDir keeps every path inside its root, whatever the path or the planted symlinks."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tartarus.runtime.hostfs import HostDir, HostFileError

segments = st.sampled_from(["..", ".", "a", "b", "out", "", "etc", "link"])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(segments, min_size=1, max_size=6))
def test_no_path_escapes_the_root(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str]
) -> None:
    base = tmp_path_factory.mktemp("hostfs")
    root = base / "root"
    root.mkdir()
    (base / "out").write_text("secret")
    (root / "a").mkdir()
    (root / "link").symlink_to(base)
    (root / "a" / "b").write_text("inside")
    files = HostDir(root)
    path = "/" + "/".join(parts)
    try:
        data = files.read_file(path)
    except (HostFileError, OSError):
        return
    assert data == b"inside"


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "shadow").symlink_to("/etc/shadow")
    (root / "dir").symlink_to("/etc")
    files = HostDir(root)
    with pytest.raises(HostFileError):
        files.read_file("/shadow")
    with pytest.raises(HostFileError):
        files.read_file("/dir/shadow")
    with pytest.raises(HostFileError):
        anyio.run(files.write_file, "/dir/evil", b"x")
    assert not Path("/etc/evil").exists()


def test_relative_and_nul_paths_are_refused(tmp_path: Path) -> None:
    files = HostDir(tmp_path)
    for bad in ("relative", "/a\0b", "/"):
        with pytest.raises(HostFileError):
            files.read_file(bad)


def test_write_is_atomic_and_keeps_mode(tmp_path: Path) -> None:
    files = HostDir(tmp_path)
    anyio.run(lambda: files.write_file("/x", b"one", mode=0o600))
    anyio.run(lambda: files.write_file("/x", b"two", mode=0o640))
    assert (tmp_path / "x").read_bytes() == b"two"
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
