"""A template's bootable ext4 image: the rootfs with `tartarus-agent` as `/sbin/init`.

The microVM boots the guest kernel with `root=/dev/vda ro init=/sbin/init`; the image
is attached read-only (virtio-blk) and `/sbin/init` is a symlink to
`/.tartarus/tartarus-agent`, which runs as PID 1 (`serve --init --listen vsock:1024`).
Images are made with `mkfs.ext4 -d` (no mount, no root needed) with a pinned UUID, hash
seed and creation time, so the same rootfs gives the same filesystem (file times come
from the rootfs itself); the symlink is added with
`debugfs` so the source directory (often a read-only store entry) is never modified.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import msgspec

from tartarus.errors import TartarusError

AGENT_PATH = "/.tartarus/tartarus-agent"
INIT_PATH = "/sbin/init"
# Free space left in the image beyond what the files need.
HEADROOM_MIB = 64
_TIMEOUT_S = 600.0


class BootImageError(TartarusError):
    """An ext4 boot image could not be made or does not boot as a microVM root."""


class BootImageReport(msgspec.Struct, frozen=True, kw_only=True):
    image: str
    size_bytes: int
    init_target: str | None
    agent_present: bool
    fsck_clean: bool

    @property
    def bootable(self) -> bool:
        return self.init_target == AGENT_PATH and self.agent_present and self.fsck_clean


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/sbin:/usr/sbin")
    if path is None:
        raise BootImageError(f"{name} not found (apt-get install e2fsprogs)")
    return path


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=_TIMEOUT_S, env=env
        )
    except subprocess.TimeoutExpired as e:
        raise BootImageError(f"{what} did not finish within {_TIMEOUT_S:.0f} s") from e
    if proc.returncode != 0:
        raise BootImageError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096 * (1 + len(dirnames))
        for name in filenames:
            try:
                total += (Path(dirpath) / name).lstat().st_size + 4096
            except OSError:
                continue
    return total


def make_boot_image(rootfs: Path, image: Path, *, size_mib: int | None = None) -> Path:
    """Writes an ext4 image of `rootfs` to `image` with `/sbin/init` -> the agent."""
    agent = rootfs / AGENT_PATH.lstrip("/")
    if not agent.is_file():
        raise BootImageError(
            f"{rootfs} has no {AGENT_PATH}; every template rootfs must carry the agent"
        )
    needed_mib = _tree_bytes(rootfs) // (1 << 20) + HEADROOM_MIB
    size = size_mib if size_mib is not None else needed_mib
    if size < needed_mib - HEADROOM_MIB // 2:
        raise BootImageError(f"{size} MiB is too small for {rootfs} (needs ~{needed_mib} MiB)")
    # A stable identity: the same rootfs path and size give the same UUID and hash seed.
    seed = uuid.UUID(bytes=hashlib.sha256(f"{rootfs.resolve()}:{size}".encode()).digest()[:16])
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1", "LC_ALL": "C"}
    _run(
        [
            _tool("mkfs.ext4"),
            "-q",
            "-F",
            "-L",
            "tartarus-root",
            "-U",
            str(seed),
            "-E",
            f"hash_seed={seed},root_owner=0:0",
            "-d",
            str(rootfs),
            str(tmp),
            f"{size}M",
        ],
        "mkfs.ext4",
        env,
    )
    init = rootfs / INIT_PATH.lstrip("/")
    if not init.is_symlink() or str(init.readlink()) != AGENT_PATH:
        commands = [] if (rootfs / "sbin").is_dir() else ["mkdir /sbin"]
        if init.exists() or init.is_symlink():
            commands.append(f"rm {INIT_PATH}")
        commands.append(f"symlink {INIT_PATH} {AGENT_PATH}")
        for command in commands:
            _run([_tool("debugfs"), "-w", "-R", command, str(tmp)], f"debugfs {command!r}", env)
    tmp.replace(image)
    return image


def _debugfs(image: Path, command: str) -> str:
    proc = subprocess.run(
        [_tool("debugfs"), "-R", command, str(image)],
        capture_output=True,
        text=True,
        check=False,
        timeout=_TIMEOUT_S,
    )
    return proc.stdout + proc.stderr


def check_boot_image(image: Path) -> BootImageReport:
    """Reads the image (without mounting it) and says whether it boots as a microVM root."""
    if not image.is_file():
        raise BootImageError(f"{image} does not exist")
    target = None
    out = _debugfs(image, f"stat {INIT_PATH}")
    for line in out.splitlines():
        if "Fast link dest:" in line:
            target = line.split("Fast link dest:", 1)[1].strip().strip('"')
    agent_present = "Type: regular" in _debugfs(image, f"stat {AGENT_PATH}")
    fsck = subprocess.run(
        [_tool("e2fsck"), "-fn", str(image)],
        capture_output=True,
        check=False,
        timeout=_TIMEOUT_S,
    )
    return BootImageReport(
        image=str(image),
        size_bytes=image.stat().st_size,
        init_target=target,
        agent_present=agent_present,
        fsck_clean=fsck.returncode == 0,
    )
