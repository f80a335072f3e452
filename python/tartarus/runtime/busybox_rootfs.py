"""A stand-in template until the image store (Erebus) provides real ones: Debian's
static busybox with every applet linked, a minimal /etc, and the agent at
`/.tartarus/tartarus-agent`. Built once per (busybox, agent) pair and cached under
`<cache>/rootfs/busybox-<hash>`."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tartarus.binaries import find_binary
from tartarus.errors import BinaryNotFoundError

BUSYBOX = Path("/bin/busybox")
_DIRS = ("bin", "etc", "tmp", "root", "proc", "dev", "sys", "home", ".tartarus/run")


def busybox_rootfs(cache_dir: Path) -> Path:
    """Returns the rootfs directory, building it if needed (safe to race)."""
    if not BUSYBOX.is_file():
        raise BinaryNotFoundError("busybox", [f"{BUSYBOX} (apt-get install busybox-static)"])
    agent = find_binary("tartarus-agent")
    digest = hashlib.sha256()
    for part in (BUSYBOX, agent):
        digest.update(part.read_bytes())
    root = cache_dir / "rootfs" / f"busybox-{digest.hexdigest()[:16]}"
    if root.is_dir():
        return root
    tmp = root.with_name(f".{root.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for d in _DIRS:
        (tmp / d).mkdir(parents=True)
    (tmp / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, tmp / "bin" / "busybox")
    listing = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in listing.stdout.split():
        if applet != "busybox":
            (tmp / "bin" / applet).symlink_to("busybox")
    (tmp / "usr").mkdir()
    (tmp / "usr" / "bin").symlink_to("../bin")
    (tmp / "sbin").symlink_to("bin")
    etc = tmp / "etc"
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\nnobody:x:65534:\n")
    (etc / "hostname").write_text("tartarus\n")
    shutil.copy2(agent, tmp / ".tartarus" / "tartarus-agent")
    try:
        tmp.rename(root)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
