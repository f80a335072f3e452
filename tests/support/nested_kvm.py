"""Nested KVM: a Linux "L1" under QEMU's emulated AMD SVM, whose /dev/kvm runs full guests.

This host's own /dev/kvm cannot run a Linux guest (it is PVM: exceptions are not
delivered). QEMU in pure emulation (`-accel tcg -cpu max,+svm`) emulates SVM with nested
paging well enough that Debian's kernel inside it loads kvm-amd and runs Linux guests
under `tartarus-vmm`. That is how the microVM tests run here.

L1 carries almost nothing of its own: an initramfs with busybox, the kernel modules it
loads (virtio, 9p, kvm-amd) and an init script. It mounts this host's root read-only over
9p and chroots into it, so the checkout, its .venv (the installed wheel with its static
`tartarus-vmm` and `tartarus-agent`), the cached guest kernel and the templates are the
very files the host has. Writes stay inside L1 (tmpfs on /tmp and /run, overlays on the
cache and state directories); results come back through a second, writable 9p share.

Cached under ~/.cache/tartarus/nested/<key>/, keyed by the L1 kernel package's version
and this harness's NESTED_VERSION: the Debian kernel package (downloaded by `make
artefacts`, never while tests run), the modules L1 loads and the initramfs.

    python -m tests.support.nested_kvm prepare     # what `make artefacts` runs
    python -m tests.support.nested_kvm run -- CMD  # boots L1, runs CMD in the chroot
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tartarus.config import load_settings
from tests.support.file_lock import locked

# Bump to rebuild the cached initramfs (e.g. after changing INIT_SCRIPT or MODULES).
NESTED_VERSION = "1"
KERNEL_META_PACKAGE = "linux-image-amd64"
# What L1 loads, dependencies first (resolved with modprobe --show-depends at build time).
MODULES = ("virtio_pci", "virtio_blk", "ext4", "9pnet_virtio", "9p", "overlay", "kvm_amd")
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
# Host paths L1 sees writable (overlay on the read-only 9p root, upper layer in L1's RAM).
OVERLAY_DIRS = ("/root/.cache/tartarus", "/root/.local/share/tartarus")
L1_MEMORY_MIB = 6144
L1_CPUS = 2
# L1's /tmp: a sparse disk image in the run's output directory, removed after the run.
L1_DISK_GIB = 16
# 9p exports: files keep the host's owners; the root spans several filesystems, so inode
# numbers are remapped to stay unique.
SHARE = "security_model=none,multidevs=remap"
PR_SET_PDEATHSIG = 1

# L1's /init. Kernel command-line words without '=' or '.' reach it as arguments; ours
# are passed as `tartarus.*` environment via /proc/cmdline instead, parsed below.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
echo "=== L1 init uptime=$(up)"
for m in $(cat /mods/order); do insmod /mods/$m || echo "=== insmod $m failed"; done
[ -c /dev/kvm ] || echo "=== L1 has no /dev/kvm"
mkdir -p /host /out
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
  || { echo "=== 9p root mount failed"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /out \
  || { echo "=== 9p out mount failed"; poweroff -f; }
# /tmp on a real disk (a sparse file on the host), as on a host: scratch disks written
# there are page cache, not tmpfs pages charged to the VMM's memory cgroup. The host's
# /tmp stays reachable for the paths the job needs from it (a checkout under /tmp).
mkdir -p /hosttmp
mount --bind /host/tmp /hosttmp
mount --rbind /dev /host/dev
if chroot /host /sbin/mkfs.ext4 -q -F -m 0 /dev/vda && mount -t ext4 /dev/vda /host/tmp; then :
else echo "=== no disk for /tmp, using tmpfs"; mount -t tmpfs -o size=4g tmpfs /host/tmp; fi
chmod 1777 /host/tmp
for p in $(cat /out/.keep); do
  case "$p" in /tmp/*) mkdir -p "/host$p"; mount --bind "/hosttmp${p#/tmp}" "/host$p";; esac
done
mount -t tmpfs tmpfs /host/run
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t cgroup2 none /host/sys/fs/cgroup
mkdir -p /ov
mount -t tmpfs -o size=4g tmpfs /ov
for d in $(cat /overlays); do
  [ -d "/host$d" ] || continue
  n=$(echo "$d" | tr / _); mkdir -p /ov/$n/u /ov/$n/w
  mount -t overlay overlay -o "lowerdir=/host$d,upperdir=/ov/$n/u,workdir=/ov/$n/w" "/host$d" \
    || mount -t tmpfs tmpfs "/host$d" || echo "=== no writable $d"
done
mkdir -p "/host$(cat /out/.mountpoint)"
mount --bind /out "/host$(cat /out/.mountpoint)"
echo "=== L1 ready uptime=$(up)"
chroot /host /bin/sh "$(cat /out/.mountpoint)/job.sh" < /dev/null
echo "=== L1 job exit=$? uptime=$(up)"
sync
poweroff -f
"""


class NestedUnavailable(RuntimeError):
    """Nested KVM cannot run here; the message is the measured reason."""


@dataclass(frozen=True)
class L1Image:
    kernel: Path
    initrd: Path
    version: str


@dataclass(frozen=True)
class L1Run:
    exit_code: int | None  # the job's exit code; None when L1 never reported one
    console: str
    seconds: float


def cache_dir() -> Path:
    """Where L1 is cached: under the cache directory the rest of Tartarus uses."""
    return load_settings().cache_dir / "nested"


def _run(argv: Sequence[str], **kw: object) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise NestedUnavailable(
            f"{shlex.join(argv)} exited {result.returncode}: {result.stderr.strip()[-400:]}"
        )
    return str(result.stdout)


def kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel Debian's linux-image-amd64 depends on today."""
    if shutil.which("apt-cache") is None:
        raise NestedUnavailable("apt-cache not on PATH: L1's kernel comes from Debian's archive")
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    names = [
        line.split()[1]
        for line in out.splitlines()
        if line.strip().startswith("Depends: linux-image-")
    ]
    if not names:
        raise NestedUnavailable(f"{KERNEL_META_PACKAGE} names no kernel package: {out[:200]}")
    show = _run(["apt-cache", "show", "--no-all-versions", names[0]])
    version = next(
        (ln.split(":", 1)[1].strip() for ln in show.splitlines() if ln.startswith("Version:")),
        "",
    )
    return names[0], version


def image_key(package: str, version: str) -> str:
    text = "\n".join([package, version, NESTED_VERSION, INIT_SCRIPT, *MODULES, *OVERLAY_DIRS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_image() -> L1Image | None:
    """The newest prepared image, without asking apt (tests must not download)."""
    base = cache_dir()
    ready = sorted(base.glob("*/READY"), key=lambda p: p.stat().st_mtime, reverse=True)
    return _image_at(ready[0].parent) if ready else None


def _image_at(d: Path) -> L1Image:
    """The prepared image in `d` (its READY file names the kernel package)."""
    return L1Image(d / "vmlinuz", d / "initrd.cpio", (d / "READY").read_text().strip())


def prepare(say: Callable[[str], None] = print) -> L1Image:
    """Downloads L1's kernel package once and builds its initramfs, cached by version."""
    for tool in (QEMU, "apt-get", "dpkg", "depmod", "modprobe", "cpio"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise NestedUnavailable(f"{tool} not found (make installs qemu-system-x86 and kmod)")
    if not BUSYBOX.exists():
        raise NestedUnavailable(f"{BUSYBOX} missing (apt-get install busybox-static)")
    package, version = kernel_package()
    key = image_key(package, version)
    d = cache_dir() / key
    if (d / "READY").exists():
        return _image_at(d)
    with locked(cache_dir() / "locks" / f"{key}.lock"):
        if (d / "READY").exists():
            return _image_at(d)
        say(f"nested KVM: preparing L1 from {package} {version}")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        _build(d, package)
        (d / "READY").write_text(f"{package} {version}\n")
        # One L1 is enough: drop those built from older kernel packages.
        for old in cache_dir().iterdir():
            if old.is_dir() and old.name not in (key, "locks"):
                shutil.rmtree(old, ignore_errors=True)
    return _image_at(d)


def _build(d: Path, package: str) -> None:
    sbin_path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    env = {**os.environ, "PATH": sbin_path}
    debs = d / "deb"
    debs.mkdir()
    _run(["apt-get", "download", "-q", package], cwd=debs, env=env)
    deb = next(debs.glob("*.deb"))
    kroot = d / "kroot"
    _run(["dpkg", "-x", str(deb), str(kroot)], env=env)
    release = package.removeprefix("linux-image-")
    shutil.copy(next((kroot / "boot").glob("vmlinuz-*")), d / "vmlinuz")
    _run(["depmod", "-b", str(kroot), release], env=env)
    order: list[Path] = []
    for module in MODULES:
        out = _run(["modprobe", "-d", str(kroot), "-S", release, "--show-depends", module], env=env)
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod" and Path(parts[1]) not in order:
                order.append(Path(parts[1]))
    root = d / "initrd"
    for sub in ("bin", "proc", "sys", "dev", "tmp", "mods"):
        (root / sub).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for ko in order:
        shutil.copy(ko, root / "mods" / ko.name)
    (root / "mods" / "order").write_text("".join(f"{ko.name}\n" for ko in order))
    (root / "overlays").write_text("".join(f"{p}\n" for p in OVERLAY_DIRS))
    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with (d / "initrd.cpio").open("wb") as sink:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            input="\n".join(files).encode(),
            stdout=sink,
            cwd=root,
            check=True,
        )
    # The deb and the unpacked tree are only inputs: keep the cache small.
    shutil.rmtree(kroot)
    shutil.rmtree(debs)
    shutil.rmtree(root)


def _die_with_parent() -> None:
    """In the QEMU child: a killed test run must not leave L1 burning a core."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def qemu_available() -> str | None:
    """None if QEMU can emulate SVM here, else the reason it cannot."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not on PATH (make installs qemu-system-x86)"
    return None


def boot(
    image: L1Image,
    job: str,
    out_dir: Path,
    *,
    timeout_s: float,
    silence_s: float | None = None,
    env: Mapping[str, str] | None = None,
    keep: Sequence[Path] = (),
    on_line: Callable[[str], None] | None = None,
) -> L1Run:
    """Boots L1 and runs `job` (a shell script) in the chroot of this host's root, with
    `out_dir` (writable, shared) at the same path inside, and the host's `keep` paths
    visible even where they lie under /tmp. Returns when L1 powers off, or is killed after
    `timeout_s`, or after `silence_s` without a console line (a wedged L1)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
    (out_dir / "job.sh").write_text(
        "set -u\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"export HOME=/root PYTHONDONTWRITEBYTECODE=1\n{exports}{job}\n"
    )
    (out_dir / ".mountpoint").write_text(str(out_dir))
    # Host paths under /tmp the job reads (L1 mounts its own /tmp over the host's).
    (out_dir / ".keep").write_text("".join(f"{p}\n" for p in keep))
    disk = out_dir / "l1-tmp.img"
    with disk.open("wb") as f:
        f.truncate(L1_DISK_GIB << 30)
    argv = [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-cpu", "max,+svm",
        "-smp", str(L1_CPUS),
        "-m", str(L1_MEMORY_MIB),
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", "console=ttyS0 rdinit=/init panic=-1 loglevel=4",
        "-virtfs", f"local,path=/,mount_tag=hostroot,{SHARE},readonly=on",
        "-virtfs", f"local,path={out_dir},mount_tag=out,{SHARE}",
        "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe,discard=unmap",
    ]  # fmt: skip
    start = time.monotonic()
    lines: list[str] = []
    exit_code: int | None = None
    # Written as it comes, so a long run can be followed with `tail -f`.
    with (
        (out_dir / "console.log").open("w") as log,
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, no locks
        ) as proc,
    ):
        assert proc.stdout is not None
        # A silent, hung L1 is killed too: the watchdog does not wait for a line.
        last_line = [time.monotonic()]
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(1.0):
                now = time.monotonic()
                if now - start >= timeout_s:
                    killed.append(f"=== host: L1 killed after {timeout_s:.0f} s")
                elif silence_s is not None and now - last_line[0] >= silence_s:
                    killed.append(f"=== host: L1 killed after {silence_s:.0f} s of silence")
                else:
                    continue
                proc.kill()
                return

        killed: list[str] = []
        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        try:
            for raw in proc.stdout:
                last_line[0] = time.monotonic()
                line = f"[{time.monotonic() - start:7.1f}] " + raw.decode(errors="replace").rstrip()
                lines.append(line)
                log.write(line + "\n")
                log.flush()
                if on_line is not None:
                    on_line(line)
                if "=== L1 job exit=" in line:
                    exit_code = int(line.split("exit=")[1].split()[0])
        finally:
            stop.set()
            proc.kill()
            watchdog.join()
        for line in killed:
            lines.append(line)
            log.write(line + "\n")
    disk.unlink(missing_ok=True)
    console = "\n".join(lines)
    return L1Run(exit_code=exit_code, console=console, seconds=time.monotonic() - start)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="download L1's kernel package and build its initramfs")
    run = sub.add_parser("run", help="boot L1 and run a shell command in the host's chroot")
    run.add_argument("--timeout", type=float, default=900)
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            if reason := qemu_available():
                print(f"nested KVM: not prepared: {reason}")
                return 0
            image = prepare()
            print(f"nested KVM: L1 ready ({image.version}, {image.initrd})")
            return 0
        image = cached_image() or prepare()
        cmd = [c for c in args.cmd if c != "--"]
        with tempfile.TemporaryDirectory(prefix="l1-") as out:
            result = boot(
                image,
                f"cd {shlex.quote(str(Path.cwd()))} && {shlex.join(cmd)}",
                Path(out),
                timeout_s=args.timeout,
                keep=[Path.cwd()],
                on_line=print,
            )
    except NestedUnavailable as e:
        print(f"nested KVM: {e}", file=sys.stderr)
        return 1
    print(f"nested KVM: L1 ran {result.seconds:.1f} s, job exit {result.exit_code}")
    return result.exit_code if result.exit_code is not None else 1


if __name__ == "__main__":
    sys.exit(main())
