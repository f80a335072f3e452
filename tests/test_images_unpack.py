"""Layer extraction: OCI whiteouts and opaque directories, symlinks resolved inside
the root, and hostile archives rejected with nothing written outside the root."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tartarus.images.errors import HostileArchiveError, ImageError, InvalidArchiveError
from tartarus.images.fsutil import remove_tree
from tartarus.images.tar import TarLimits, open_decompressed
from tartarus.images.unpack import symlink_escapes, unpack
from tests.support.archives import (
    Member,
    directory,
    file,
    hardlink,
    make_tar,
    make_tgz,
    symlink,
)


def apply(root: Path, *layers: bytes, limits: TarLimits | None = None) -> None:
    for i, layer in enumerate(layers):
        stream = open_decompressed(io.BytesIO(layer), f"layer{i}")
        unpack(stream, str(root), archive=f"layer{i}", limits=limits)


def snapshot(path: Path) -> dict[str, str]:
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        if p.is_symlink():
            out[rel] = "-> " + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = p.read_bytes().decode(errors="replace")
    return out


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """A staging root, and a canary directory beside it that must never change."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    return root, outside


def test_layers_whiteouts_and_opaque_dirs(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    lower = make_tgz(
        [
            directory("etc"),
            file("etc/keep", b"keep"),
            file("etc/gone", b"gone"),
            directory("opt/app"),
            file("opt/app/old", b"old"),
            directory("opt/app/sub"),
            file("opt/app/sub/old2", b"old2"),
            symlink("bin", "usr/bin"),
            directory("usr/bin"),
            file("usr/bin/tool", b"v1", mode=0o755),
        ]
    )
    upper = make_tgz(
        [
            file("opt/app/sub/new", b"new"),  # before the opaque marker: must survive
            file("opt/app/.wh..wh..opq"),
            file("etc/.wh.gone"),
            file("etc/added", b"added"),
            file("etc/.wh.added"),  # same-layer whiteout never hides same-layer content
            file("bin/tool2", b"via merged-usr symlink", mode=0o755),
            file("usr/bin/tool", b"v2", mode=0o755),
        ]
    )
    apply(root, lower, upper)
    assert snapshot(root) == {
        "bin": "-> usr/bin",
        "etc": "dir",
        "etc/added": "added",
        "etc/keep": "keep",
        "opt": "dir",
        "opt/app": "dir",
        "opt/app/sub": "dir",
        "opt/app/sub/new": "new",
        "usr": "dir",
        "usr/bin": "dir",
        "usr/bin/tool": "v2",
        "usr/bin/tool2": "via merged-usr symlink",
    }
    assert (root / "usr/bin/tool2").stat().st_mode & 0o777 == 0o755


def test_read_only_directory_still_receives_children(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    apply(root, make_tar([directory("ro", mode=0o555), file("ro/f", b"x")]))
    assert (root / "ro/f").read_bytes() == b"x"
    assert (root / "ro").stat().st_mode & 0o777 == 0o555


def test_replacing_file_with_dir_and_back(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    apply(
        root,
        make_tar([file("x", b"file"), symlink("y", "/etc")]),
        make_tar([directory("x"), file("x/inner", b"in"), directory("y")]),
        make_tar([file("x", b"file again")]),
    )
    assert (root / "x").read_bytes() == b"file again"
    assert (root / "y").is_dir() and not (root / "y").is_symlink()


def test_absolute_symlink_in_parent_resolves_inside_root(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    layer = make_tar([symlink("escape", str(outside)), file("escape/secret", b"pwned")])
    apply(root, layer)
    assert (outside / "secret").read_text() == "host secret"
    assert (root / outside.relative_to("/") / "secret").read_bytes() == b"pwned"


def test_dotdot_in_symlink_chain_is_clamped_at_root(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    layer = make_tar([directory("a"), symlink("a/up", "/../../.."), file("a/up/newfile", b"x")])
    apply(root, layer)
    assert (root / "newfile").read_bytes() == b"x"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


HOSTILE: dict[str, tuple[list[Member], str]] = {
    "absolute path": ([file("/etc/passwd", b"x")], "absolute path"),
    "dotdot": ([file("../outside/evil", b"x")], r"'\.\.' in path"),
    "dotdot inside": ([file("a/../../outside/evil", b"x")], r"'\.\.' in path"),
    "relative symlink escape": (
        [directory("a"), symlink("a/link", "../../outside/secret")],
        "points outside the root",
    ),
    "hardlink absolute": ([hardlink("h", "/etc/shadow")], "hardlink to absolute"),
    "hardlink dotdot": ([hardlink("h", "../outside/secret")], r"'\.\.' in hardlink"),
    "hardlink to directory": ([directory("d"), hardlink("h", "d")], "hardlink to a directory"),
    "char device": ([Member("dev/mem", tarfile.CHRTYPE)], "device node"),
    "block device": ([Member("dev/sda", tarfile.BLKTYPE)], "device node"),
    "whiteout dotdot": ([file(".wh..")], "invalid name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_rejected(sandbox: tuple[Path, Path], case: str) -> None:
    root, outside = sandbox
    members, message = HOSTILE[case]
    with pytest.raises(HostileArchiveError, match=message):
        apply(root, make_tgz(members))
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret"
    assert not (root.parent / "etc").exists()


def test_hardlink_through_symlink_to_outside_is_not_possible(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    # The link target's parent is a symlink to the host directory: it resolves inside
    # the root, where the file does not exist.
    layer = make_tar([symlink("out", str(outside)), hardlink("h", "out/secret")])
    with pytest.raises(InvalidArchiveError, match="does not exist"):
        apply(root, layer)
    assert (outside / "secret").stat().st_nlink == 1


def test_gzip_bomb_is_stopped(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    bomb = make_tgz([file("zeros", bytes(64 << 20))])
    assert len(bomb) < 1 << 20
    with pytest.raises(HostileArchiveError, match="limit"):
        apply(root, bomb, limits=TarLimits(max_total_bytes=8 << 20))
    assert not (root / "zeros").exists() or (root / "zeros").stat().st_size == 0


def test_zstd_layers_unpack_and_their_bombs_are_stopped(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    compress = zstandard.ZstdCompressor().compress
    apply(root, compress(make_tar([file("etc/zstd", b"zstd layer")])))
    assert (root / "etc/zstd").read_bytes() == b"zstd layer"
    bomb = compress(make_tar([file("zeros", bytes(64 << 20))]))
    assert len(bomb) < 1 << 20
    with pytest.raises(HostileArchiveError, match="limit"):
        apply(root, bomb, limits=TarLimits(max_total_bytes=8 << 20))


def test_total_size_limit_across_files(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    layer = make_tar([file(f"f{i}", bytes(1 << 20)) for i in range(10)])
    with pytest.raises(HostileArchiveError, match="byte limit"):
        apply(root, layer, limits=TarLimits(max_total_bytes=5 << 20))


def test_corrupt_gzip_is_a_clear_error(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    layer = bytearray(make_tgz([file("a", os.urandom(100_000))]))
    layer[len(layer) // 2] ^= 0xFF
    with pytest.raises(ImageError):
        apply(root, bytes(layer))


@pytest.mark.parametrize(
    ("location", "target", "escapes"),
    [
        ([], "a", False),
        ([], "../a", True),
        (["usr", "bin"], "../../lib/x", False),
        (["usr", "bin"], "../../../x", True),
        (["a"], "/anything/../../..", False),
        (["a"], "b/../../..", True),
    ],
)
def test_symlink_escape_rule(location: list[str], target: str, escapes: bool) -> None:
    assert symlink_escapes(location, target) is escapes


_comp = st.sampled_from(["a", "b", "..", ".", "", "/", "c"])


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["file", "dir", "symlink", "hardlink", "whiteout"]),
            st.lists(_comp, min_size=1, max_size=5).map("/".join),
            st.lists(_comp, min_size=1, max_size=5).map("/".join),
        ),
        max_size=12,
    )
)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_random_layers_never_write_outside(tmp_path: Path, ops: list[tuple[str, str, str]]) -> None:
    root = tmp_path / "r" / "root"
    remove_tree(root.parent)
    root.mkdir(parents=True)
    members = []
    for kind, name, target in ops:
        if kind == "file":
            members.append(file(name, b"x"))
        elif kind == "dir":
            members.append(directory(name))
        elif kind == "symlink":
            members.append(symlink(name, target))
        elif kind == "hardlink":
            members.append(hardlink(name, target))
        else:
            members.append(file(f"{name}/.wh.{target.rsplit('/', 1)[-1]}"))
    with contextlib.suppress(ImageError):
        apply(root, make_tar(members))
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["root"]
