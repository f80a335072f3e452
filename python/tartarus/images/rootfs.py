"""What Tartarus puts into every root filesystem, and the microVM's ext4 image.

Layout (backends rely on it):
- `/.tartarus/tartarus-agent`: the agent binary of this installation;
- `/.tartarus/run/`: empty; the host binds the agent's socket directory here;
- in the ext4 image only, `/sbin/init` -> `/.tartarus/tartarus-agent`, so the guest
  kernel starts the agent as PID 1;
- `/etc/hosts` naming localhost and the sandbox's hostname, when the image has none
  (Debian's debootstrap and many OCI images leave it to the container runtime; without
  it `localhost` does not resolve, on any backend).
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path

import anyio
import anyio.to_thread

from tartarus.binaries import find_binary
from tartarus.images import fsutil
from tartarus.images.errors import BuildError, ImageError
from tartarus.images.progress import ProgressCallback
from tartarus.images.steps import require_tool, run_logged
from tartarus.runtime.types import SANDBOX_HOSTNAME

RESERVED_DIR = ".tartarus"
AGENT_PATH = "/.tartarus/tartarus-agent"
RUN_DIR = "/.tartarus/run"
INIT_PATH = "/sbin/init"
# Layout version: part of every rootfs key, bumped when injection changes.
LAYOUT_VERSION = 2
MiB = 1 << 20
BLOCK = 4096
INODE_SIZE = 256


def agent_binary() -> Path:
    """The agent to inject (`TARTARUS_AGENT_BIN` overrides; the error lists where it looked)."""
    return find_binary("tartarus-agent")


def inject_agent(root: Path, agent: Path) -> None:
    """Replaces whatever the image had at /.tartarus with ours."""
    reserved = root / RESERVED_DIR
    fsutil.remove_tree(reserved)
    reserved.mkdir(mode=0o755)
    target = reserved / "tartarus-agent"
    shutil.copyfile(agent, target)
    target.chmod(0o755)
    (reserved / "run").mkdir(mode=0o755)
    if os.geteuid() == 0:
        for p in (reserved, target, reserved / "run"):
            os.chown(p, 0, 0, follow_symlinks=False)


# Debian's own default (netcfg), with the hostname every sandbox has.
ETC_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    f"127.0.1.1\t{SANDBOX_HOSTNAME}\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


def ensure_etc_hosts(root: Path) -> None:
    """Writes /etc/hosts unless the image has one (a symlink counts: it is the image's)."""
    etc = root / "etc"
    hosts = etc / "hosts"
    if not etc.is_dir() or etc.is_symlink() or hosts.exists() or hosts.is_symlink():
        return
    hosts.write_text(ETC_HOSTS)
    hosts.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(hosts, 0, 0, follow_symlinks=False)


def resolve_in_tree(root: Path, rel: str) -> str | None:
    """The real path of directory `rel` inside `root`, following symlinks as if `root`
    were `/`; None if it does not exist or is not a directory."""
    parts = [p for p in rel.split("/") if p]
    real: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            if real:
                real.pop()
            continue
        path = root.joinpath(*real, name)
        if path.is_symlink():
            hops += 1
            if hops > 40:
                return None
            target = os.readlink(path)  # noqa: PTH115 (keep the raw target)
            if target.startswith("/"):
                real = []
            parts = target.split("/") + parts
            continue
        if not path.is_dir():
            return None
        real.append(name)
    return "/".join(real)


def _image_size(tree: Path) -> tuple[int, int]:
    """(bytes, inodes) for an ext4 image holding `tree` with room to spare."""
    data = 0
    inodes = 0
    for _, st in fsutil.walk(tree):
        inodes += 1
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
            data += (st.st_size + BLOCK - 1) // BLOCK * BLOCK
    inodes = inodes + inodes // 4 + 1024
    size = int(data * 1.2) + inodes * INODE_SIZE + 64 * MiB
    return (size + MiB - 1) // MiB * MiB, inodes


def _init_commands(tree: Path) -> str:
    sbin = resolve_in_tree(tree, "sbin")
    commands = []
    if sbin is None:
        if (tree / "sbin").is_symlink() or (tree / "sbin").exists():
            raise ImageError("/sbin in the rootfs is neither a directory nor a link to one")
        commands.append("mkdir /sbin")
        sbin = "sbin"
    init = tree / sbin / "init"
    if init.is_dir() and not init.is_symlink():
        raise ImageError(f"/{sbin}/init in the rootfs is a directory; cannot install the agent")
    if init.exists() or init.is_symlink():
        commands.append(f"rm /{sbin}/init")
    commands.append(f"symlink /{sbin}/init {AGENT_PATH}")
    return "\n".join(commands) + "\n"


async def make_ext4(tree: Path, dest: Path, *, seed: str, progress: ProgressCallback) -> None:
    """Writes an ext4 image of `tree` to `dest` (`mkfs.ext4 -d`), then links /sbin/init
    to the agent inside the image only. Same tree and seed give the same image."""
    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    debugfs = require_tool("debugfs", "e2fsprogs")
    size, inodes = await anyio.to_thread.run_sync(_image_size, tree)
    await anyio.Path(dest).touch()
    fs_uuid = str(uuid.UUID(hex=seed[:32]))
    # Fixed timestamps make the image reproducible.
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"}
    await anyio.to_thread.run_sync(os.truncate, dest, size)
    await run_logged(
        [
            mkfs,
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            str(BLOCK),
            "-I",
            str(INODE_SIZE),
            "-N",
            str(inodes),
            "-m",
            "0",
            "-L",
            "tartarus",
            "-U",
            fs_uuid,
            "-E",
            f"root_owner=0:0,hash_seed={fs_uuid}",
            "-d",
            str(tree),
            str(dest),
        ],
        step="ext4",
        progress=progress,
        env=env,
    )
    commands = await anyio.to_thread.run_sync(_init_commands, tree)
    await run_logged(
        [debugfs, "-w", "-f", "-", str(dest)],
        step="ext4",
        progress=progress,
        env=env,
        stdin=commands.encode(),
    )
    proc = await anyio.run_process(
        [debugfs, "-R", f"stat {INIT_PATH}", str(dest)], check=False, env=env
    )
    if f'Fast link dest: "{AGENT_PATH}"'.encode() not in proc.stdout:
        raise BuildError(
            f"ext4 image: {INIT_PATH} does not point to {AGENT_PATH} after debugfs:\n"
            + proc.stdout.decode("utf-8", "replace")[-2000:]
        )
