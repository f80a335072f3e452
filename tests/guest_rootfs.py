"""A minimal busybox rootfs with the agent, for tests until template images exist."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tartarus.binaries import find_binary

BUSYBOX = Path("/bin/busybox")


def busybox_rootfs(root: Path) -> Path:
    """busybox-static, its applet links and the agent at /.tartarus/tartarus-agent."""
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static not installed (make test installs it)")
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", ".tartarus"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    shutil.copy2(find_binary("tartarus-agent"), root / ".tartarus" / "tartarus-agent")
    return root
