"""The template's ext4 boot image: agent as /sbin/init, made without mounting."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tartarus.guest.boot_image import (
    AGENT_PATH,
    BootImageError,
    check_boot_image,
    make_boot_image,
)
from tests.guest_rootfs import busybox_rootfs


@pytest.mark.timeout(120)
def test_image_boots_the_agent_as_init(tmp_path: Path) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    image = make_boot_image(rootfs, tmp_path / "root.ext4")
    report = check_boot_image(image)
    assert report.init_target == AGENT_PATH
    assert report.agent_present and report.fsck_clean and report.bootable
    # The source tree was not modified.
    assert not (rootfs / "sbin" / "init").exists()


def _identity(image: Path) -> tuple[str, str]:
    header = subprocess.run(
        ["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True
    ).stdout
    wanted = ("Filesystem UUID", "Directory Hash Seed", "Filesystem created", "Block count")
    fields = "\n".join(line for line in header.splitlines() if line.startswith(wanted))
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /bin", str(image)], capture_output=True, text=True, check=True
    ).stdout
    return fields, listing


@pytest.mark.timeout(120)
def test_same_rootfs_gives_the_same_image(tmp_path: Path) -> None:
    # Byte equality would also need the rootfs's access times to stand still (mkfs
    # copies them); identity, layout, owners, modes and mtimes are what we pin.
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    a = make_boot_image(rootfs, tmp_path / "a.ext4", size_mib=80)
    b = make_boot_image(rootfs, tmp_path / "b.ext4", size_mib=80)
    assert a.stat().st_size == b.stat().st_size
    assert _identity(a) == _identity(b)


@pytest.mark.timeout(120)
def test_existing_init_is_replaced_by_the_agent(tmp_path: Path) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    (rootfs / "sbin" / "init").symlink_to("/bin/busybox")
    report = check_boot_image(make_boot_image(rootfs, tmp_path / "root.ext4"))
    assert report.bootable


def test_rootfs_without_agent_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rootfs" / "bin").mkdir(parents=True)
    with pytest.raises(BootImageError, match=r"no /\.tartarus/tartarus-agent"):
        make_boot_image(tmp_path / "rootfs", tmp_path / "root.ext4")


@pytest.mark.timeout(120)
def test_too_small_and_broken_images_are_reported(tmp_path: Path) -> None:
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    with pytest.raises(BootImageError, match="too small"):
        make_boot_image(rootfs, tmp_path / "root.ext4", size_mib=1)
    garbage = tmp_path / "garbage.ext4"
    garbage.write_bytes(b"\0" * (1 << 20))
    report = check_boot_image(garbage)
    assert not report.bootable
    with pytest.raises(BootImageError, match="does not exist"):
        check_boot_image(tmp_path / "missing.ext4")
