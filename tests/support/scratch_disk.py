"""Scratch disks for the tests of the microVM's writable root: ext4 images (full ones too),
loop devices for them, and reading files out of an image without mounting it (debugfs)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SBIN = "/usr/sbin:/sbin"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=SBIN)
    if path is None:
        pytest.skip(f"{name} not found (make test installs it with apt-get)")
    return path


def make_ext4(image: Path, size_mib: int = 32, *, inodes: int | None = None) -> Path:
    """A sparse ext4 image formatted the way the microVM backend formats scratch disks
    (with only `inodes` inodes, if given)."""
    with image.open("xb") as f:
        f.truncate(size_mib << 20)
    extra = ["-N", str(inodes)] if inodes is not None else []
    subprocess.run(
        [tool("mkfs.ext4"), "-q", "-F", "-L", "scratch", "-m", "0", *extra, str(image)],
        check=True,
        capture_output=True,
    )
    return image


def use_up_inodes(image: Path, *, leave: int) -> None:
    """Creates empty directories in `image` until only `leave` inodes are free."""
    header = subprocess.run(
        [tool("dumpe2fs"), "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    free = next(
        int(line.split(":")[1]) for line in header.splitlines() if line.startswith("Free inodes:")
    )
    script = "".join(f"mkdir /filler{i}\n" for i in range(free - leave))
    subprocess.run(
        [tool("debugfs"), "-w", "-f", "-", str(image)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )


@contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """`image` attached to a free loop device, detached afterwards."""
    losetup = tool("losetup")
    attach = subprocess.run(
        [losetup, "--find", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if attach.returncode != 0:
        pytest.skip(f"cannot attach a loop device here: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "--detach", device], check=True)


def read_ext4_file(image: Path, path: str, *, live: bool = False) -> bytes | None:
    """The content of `path` inside the ext4 `image`, or None when it is not there.

    `live`: the image is mounted in a running guest, whose synced writes may still be only
    in the journal (debugfs does not replay it): read a copy whose journal e2fsck replayed.
    """
    if not image.exists():
        raise FileNotFoundError(image)  # debugfs would print an error and read nothing
    if live:
        with tempfile.TemporaryDirectory(prefix="ext4-") as tmp:
            copy = Path(tmp) / image.name
            subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
            # Exit 1 means "fixed": replaying the journal is a fix. 4 and up are failures.
            fsck = subprocess.run(
                [tool("e2fsck"), "-fy", str(copy)], check=False, capture_output=True
            )
            assert fsck.returncode < 4, fsck.stdout.decode()[-800:]
            return read_ext4_file(copy, path)
    result = subprocess.run(
        [tool("debugfs"), "-R", f"cat {path}", str(image)], capture_output=True, check=True
    )
    if b"not found" in result.stderr:
        return None
    return result.stdout
