"""`tartarus-agent --init` with a scratch disk: the microVM's writable root, run here.

No Linux guest boots on this host, so these tests recreate what the guest kernel hands
the agent: the real agent binary as PID 1 of a new mount and PID namespace, chrooted into
a busybox rootfs that is bind-mounted read-only (the template image), a scratch ext4 image
on a loop device (`/dev/vdb`), and a kernel command line read from a file
(`--kernel-cmdline`, since /proc/cmdline is the host's). Everything is then checked
through the agent client, and the scratch image is read with debugfs afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from tartarus.runtime.types import ExecRequest, ExecResult
from tests.guest_rootfs import busybox_rootfs
from tests.support.agent import HostAgentSandbox
from tests.support.scratch_disk import loop_device, make_ext4, read_ext4_file, use_up_inodes

pytestmark = pytest.mark.timeout(120)

MicroVmCheck = Callable[[HostAgentSandbox], Awaitable[None]]


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip(f"mount namespaces, loop devices and chroot need root (euid {os.geteuid()})")
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not on PATH")
    root = busybox_rootfs(tmp_path / "root")
    (root / ".tartarus" / "run").mkdir()
    (root / "scratch").mkdir()
    (root / "etc" / "motd").write_text("from the template\n")
    (root / "srv" / "app").mkdir(parents=True)
    (root / "srv" / "app" / "main.py").write_text("print('hi')\n")
    return root


def _require_overlayfs() -> None:
    if "\toverlay\n" not in Path("/proc/filesystems").read_text():
        pytest.skip("this host kernel has no overlayfs (/proc/filesystems)")


@contextmanager
def _init_agent(tmp_path: Path, root: Path, kernel_cmdline: str) -> Iterator[tuple[Path, Path]]:
    """The agent as PID 1 of fresh mount and PID namespaces on the read-only `root`, with
    `kernel_cmdline` as its kernel command line. Yields (socket, stderr file); on exit
    checks the agent (asked to shut down by the caller) ended cleanly."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "cmdline").write_text(kernel_cmdline + "\n")
    script = (
        f'mount --bind "{root}" "{root}" && mount -o remount,bind,ro "{root}" && '
        f'mount --bind "{run}" "{root}/.tartarus/run" && '
        f'exec chroot "{root}" /.tartarus/tartarus-agent serve '
        "--listen unix:/.tartarus/run/agent.sock --init "
        "--kernel-cmdline /.tartarus/run/cmdline"
    )
    argv = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script]
    stderr_path = tmp_path / "agent.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
        try:
            sock = run / "agent.sock"
            for _ in range(200):
                if sock.exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            assert sock.exists(), stderr_path.read_text()
            yield sock, stderr_path
            assert proc.wait(timeout=15) == 0, stderr_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The sandbox's mounts lived and died with its mount namespace.
    assert str(root) not in Path("/proc/self/mounts").read_text()


def _serve(sock: Path, check: MicroVmCheck) -> None:
    async def main() -> None:
        sb = HostAgentSandbox(sock)
        await sb.start()
        try:
            await check(sb)
        finally:
            await sb.stop(grace_s=2)

    anyio.run(main)


async def _sh(sb: HostAgentSandbox, script: str) -> ExecResult:
    return await (await sb.exec(ExecRequest(shell=script))).wait()


def _mount_table(text: str) -> dict[str, tuple[str, set[str]]]:
    """/proc/mounts as {mount point: (fs type, options)}; the last mount on a path wins."""
    table = {}
    for line in text.splitlines():
        _, point, fstype, options, *_ = line.split()
        table[point] = (fstype, set(options.split(",")))
    return table


def test_scratch_disk_makes_an_overlay_root(tmp_path: Path, rootfs: Path) -> None:
    _require_overlayfs()
    image = make_ext4(tmp_path / "scratch.ext4")

    async def check(sb: HostAgentSandbox) -> None:
        r = await _sh(
            sb,
            "echo a > /x && echo b > /etc/x && echo c > /tmp/f && echo more >> /etc/motd && "
            "mkdir -p /home/user && cd /home/user && echo d > notes && "
            "cat /x /etc/x /tmp/f /etc/motd notes",
        )
        assert r.exit.ok, r
        assert r.stdout == b"a\nb\nc\nfrom the template\nmore\nd\n"
        await sb.make_dir("/root", parents=True)
        await sb.write_file("/root/blob", b"\x00\xff" * 40000)
        assert await sb.read_file("/root/blob") == b"\x00\xff" * 40000
        # A directory of the template can be renamed (rename(2), no copy fallback).
        await sb.rename("/srv/app", "/srv/app2")
        assert await sb.read_file("/srv/app2/main.py") == b"print('hi')\n"
        # Deleting a file of the template hides it (a whiteout on the scratch disk).
        assert (await _sh(sb, "rm /bin/vi && test ! -e /bin/vi")).exit.ok
        table = _mount_table((await _sh(sb, "cat /proc/mounts")).stdout.decode())
        assert table["/"][0] == "overlay" and "rw" in table["/"][1]
        assert table["/proc"][0] == "proc" and table["/dev"][0] == "devtmpfs"
        assert "/tmp" not in table, "/tmp is the overlay's, on the scratch disk"
        assert table["/.tartarus/run"][0] != "overlay", "the host's bind mount moved along"
        assert not any(point.startswith("/tmp/overlay") for point in table)

    with (
        loop_device(image) as device,
        _init_agent(tmp_path, rootfs, f"root=/dev/vda ro tartarus.scratch={device}") as (
            sock,
            stderr,
        ),
    ):
        _serve(sock, check)
        assert "scratch disk" not in stderr.read_text()
    # The writes landed on the scratch disk, in the overlay's upper directory...
    assert read_ext4_file(image, "/overlay/upper/x") == b"a\n"
    assert read_ext4_file(image, "/overlay/upper/etc/x") == b"b\n"
    assert read_ext4_file(image, "/overlay/upper/tmp/f") == b"c\n"
    assert read_ext4_file(image, "/overlay/upper/etc/motd") == b"from the template\nmore\n"
    assert read_ext4_file(image, "/overlay/upper/home/user/notes") == b"d\n"
    assert read_ext4_file(image, "/overlay/upper/root/blob") == b"\x00\xff" * 40000
    # ...and the read-only root underneath is untouched.
    assert not (rootfs / "x").exists() and not (rootfs / "etc" / "x").exists()
    assert not (rootfs / "tmp" / "f").exists() and not (rootfs / "home").exists()
    assert (rootfs / "etc" / "motd").read_text() == "from the template\n"
    assert (rootfs / "bin" / "vi").is_symlink()
    assert (rootfs / "srv" / "app" / "main.py").is_file()


def test_without_the_parameter_the_root_stays_read_only(tmp_path: Path, rootfs: Path) -> None:
    async def check(sb: HostAgentSandbox) -> None:
        r = await _sh(sb, "echo c > /tmp/f && cat /tmp/f; touch /x")
        assert r.stdout == b"c\n"
        assert b"Read-only file system" in r.stderr
        table = _mount_table((await _sh(sb, "cat /proc/mounts")).stdout.decode())
        assert table["/tmp"][0] == "tmpfs"
        assert "ro" in table["/"][1]

    with _init_agent(tmp_path, rootfs, "console=ttyS0 root=/dev/vda ro") as (sock, stderr):
        _serve(sock, check)
        assert stderr.read_text() == ""
    assert not (rootfs / "tmp" / "f").exists()


@pytest.mark.parametrize(
    ("device", "why"),
    [
        ("/dev/no-such-scratch-disk", "No such file or directory"),
        ("/dev/zero", "Block device required"),
        ("vdb", "is not a device path"),
    ],
)
def test_a_bad_scratch_device_is_reported_and_the_agent_serves(
    tmp_path: Path, rootfs: Path, device: str, why: str
) -> None:
    async def check(sb: HostAgentSandbox) -> None:
        r = await _sh(sb, "echo c > /tmp/f && cat /tmp/f; touch /x")
        assert r.stdout == b"c\n"
        assert b"Read-only file system" in r.stderr

    with _init_agent(tmp_path, rootfs, f"ro tartarus.scratch={device}") as (sock, stderr):
        _serve(sock, check)
        log = stderr.read_text()
    assert device in log and why in log, log


def test_a_full_scratch_disk_still_gives_a_disk_backed_tmp(tmp_path: Path, rootfs: Path) -> None:
    """No room for the overlay's directories: the agent says so, cleans up, and serves
    with the scratch disk on /tmp (better than a tmpfs in guest memory)."""
    _require_overlayfs()
    image = make_ext4(tmp_path / "scratch.ext4", 8, inodes=16)
    # One free inode: /tmp/overlay is made, /tmp/overlay/upper is not.
    use_up_inodes(image, leave=1)

    async def check(sb: HostAgentSandbox) -> None:
        r = await _sh(sb, "echo c > /tmp/f && cat /tmp/f; touch /x")
        assert r.stdout == b"c\n"
        assert b"Read-only file system" in r.stderr
        table = _mount_table((await _sh(sb, "cat /proc/mounts")).stdout.decode())
        assert table["/tmp"][0] == "ext4"
        assert table["/"][0] != "overlay"

    with (
        loop_device(image) as device,
        _init_agent(tmp_path, rootfs, f"ro tartarus.scratch={device}") as (sock, stderr),
    ):
        _serve(sock, check)
        log = stderr.read_text()
    assert "no overlay root" in log and "No space left on device" in log, log
    assert "/tmp is on the scratch disk" in log, log
    assert read_ext4_file(image, "/f") == b"c\n"
    assert read_ext4_file(image, "/overlay") is None


def test_scratch_mode_mount_mounts_the_disk_at_a_path(tmp_path: Path, rootfs: Path) -> None:
    image = make_ext4(tmp_path / "scratch.ext4")

    async def check(sb: HostAgentSandbox) -> None:
        r = await _sh(sb, "echo s > /scratch/f && cat /scratch/f; touch /x")
        assert r.stdout == b"s\n"
        assert b"Read-only file system" in r.stderr
        table = _mount_table((await _sh(sb, "cat /proc/mounts")).stdout.decode())
        assert table["/scratch"][0] == "ext4"
        assert table["/tmp"][0] == "tmpfs"

    with (
        loop_device(image) as device,
        _init_agent(
            tmp_path, rootfs, f"ro tartarus.scratch_mode=mount:/scratch tartarus.scratch={device}"
        ) as (sock, stderr),
    ):
        _serve(sock, check)
        assert stderr.read_text() == ""
    assert read_ext4_file(image, "/f") == b"s\n"
    assert not (rootfs / "scratch" / "f").exists()
