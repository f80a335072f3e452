"""`tartarus-agent --init` on a read-only root, as in a microVM booted from the
template's ext4 image: /tmp exists in the image but must still be writable.

The root is a read-only bind mount in a private mount namespace (root needed), with a
writable /.tartarus/run bound in for the agent's socket, the way a host binds it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from tartarus.binaries import find_binary
from tartarus.runtime.types import ExecRequest
from tests.support.agent import HostAgentSandbox

BUSYBOX_APPLETS = ("sh", "cat", "echo", "test", "touch")


def _image_like_rootfs(root: Path) -> None:
    """busybox, the agent, and the empty /proc, /dev and /tmp an image carries."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox (Debian busybox-static) is not installed")
    for d in ("bin", "proc", "dev", "tmp", ".tartarus/run"):
        (root / d).mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    shutil.copy2(find_binary("tartarus-agent"), root / ".tartarus" / "tartarus-agent")


@pytest.mark.timeout(60)
def test_init_makes_tmp_writable_on_a_read_only_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mount namespaces and chroot need root (euid is {os.geteuid()})")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not on PATH")
    root = tmp_path / "root"
    _image_like_rootfs(root)
    run = tmp_path / "run"
    run.mkdir()
    script = (
        f'mount --bind "{root}" "{root}" && mount -o remount,bind,ro "{root}" && '
        f'mount --bind "{run}" "{root}/.tartarus/run" && '
        f'exec chroot "{root}" /.tartarus/tartarus-agent serve '
        "--listen unix:/.tartarus/run/agent.sock --init"
    )
    argv = [unshare, "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script]

    async def check(sock_path: Path) -> None:
        sb = HostAgentSandbox(sock_path)
        await sb.start()
        try:
            execution = await sb.exec(
                ExecRequest(shell="echo hi > /tmp/f && cat /tmp/f; touch /rootfile")
            )
            result = await execution.wait()
            assert result.stdout == b"hi\n"
            assert b"Read-only file system" in result.stderr, "the root stays read-only"
        finally:
            await sb.stop(grace_s=2)

    stderr = (tmp_path / "agent.stderr").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        sock = run / "agent.sock"
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert sock.exists(), (tmp_path / "agent.stderr").read_text()
        anyio.run(check, sock)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    assert not (root / "tmp" / "f").exists(), "the file went to the tmpfs, not the image"
    assert str(root) not in Path("/proc/self/mounts").read_text()
