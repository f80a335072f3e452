"""A Debian root filesystem other than the host's, for installing the wheel the way a
user on another distribution would: built once with debootstrap, cached under the
user's cache directory, entered with chroot in a private mount and PID namespace.

The cache key is the suite, the architecture, the package list and ROOT_VERSION: change
any of them and a new root is built beside the old one.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tartarus.images.debian import debian_arch
from tartarus.paths import default_cache_dir
from tests.support.file_lock import locked

# Bump to rebuild every cached root (e.g. after changing how it is built).
ROOT_VERSION = "1"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MIRROR = "http://deb.debian.org/debian"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RootBuildError(RuntimeError):
    """debootstrap failed; the message carries the end of its log."""


def cache_root() -> Path:
    return default_cache_dir() / "test-roots"


def root_key(suite: str, packages: Sequence[str]) -> str:
    text = "\n".join([suite, debian_arch(), *sorted(packages), ROOT_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_root(suite: str, packages: Sequence[str], say: Callable[[str], None]) -> Path:
    """The cached root for `suite` with `packages` (debootstrap's minbase plus them),
    built under a lock the first time. Raises RootBuildError with debootstrap's log."""
    key = root_key(suite, packages)
    base = cache_root()
    done = base / f"{suite}-{key}"
    if (done / "usr/bin/python3").exists():
        return done
    with locked(base / "locks" / f"{suite}-{key}.lock"):
        if (done / "usr/bin/python3").exists():
            return done
        staging = base / f".staging-{suite}-{key}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        debs = base / "debs" / f"{suite}-{debian_arch()}"
        debs.mkdir(parents=True, exist_ok=True)
        log = base / f"{suite}-{key}.log"
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "debootstrap",
            "--variant=minbase",
            f"--arch={debian_arch()}",
            f"--include={','.join(sorted(packages))}",
            f"--cache-dir={debs}",
            f"--keyring={KEYRING}",
            suite,
            str(staging),
            MIRROR,
        ]
        say(f"building a Debian {suite} root with debootstrap (once; cached at {done}; log {log})")
        start = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={"PATH": PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"},
            )
            while proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    last = log.read_text(errors="replace").strip().rsplit("\n", 1)[-1]
                    say(f"  debootstrap {suite}: {time.monotonic() - start:.0f} s: {last[:100]}")
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            shutil.rmtree(staging, ignore_errors=True)
            raise RootBuildError(
                f"debootstrap {suite} exited with {proc.returncode}:\n{tail}\n(full log: {log})"
            )
        # A root that only the builder's own mounts could pollute: the archive's .debs
        # live in `debs`, not in the root.
        shutil.rmtree(staging / "var/cache/apt/archives", ignore_errors=True)
        (staging / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        # Each run binds the host's resolv.conf over this one.
        (staging / "etc/resolv.conf").unlink(missing_ok=True)
        (staging / "etc/resolv.conf").write_text("")
        staging.rename(done)
        say(f"built the {suite} root in {time.monotonic() - start:.0f} s")
    return done


def chroot_argv(
    root: Path,
    argv: Sequence[str],
    *,
    binds: Mapping[str, Path] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
) -> list[str]:
    """`argv` run as root inside `root` with chroot, in a private mount and PID
    namespace: a fresh /proc, the host's /sys (with its cgroup mounts), /dev and
    resolv.conf bound in, tmpfs on /tmp and /run, `binds` (path under /mnt inside ->
    host path) read-write. The cached root itself is mounted read-only, so a run cannot change it;
    what a run writes goes to its binds."""
    r = shlex.quote(str(root))
    lines = [
        "set -eu",
        f"mount --bind {r} {r}",
        f"mount -o remount,bind,ro {r}",
        f"mount -t proc proc {r}/proc",
        f"mount --rbind /sys {r}/sys",
        f"mount --rbind /dev {r}/dev",
        f"mount -t tmpfs -o mode=1777 tmpfs {r}/tmp",
        f"mount -t tmpfs -o mode=755 tmpfs {r}/run",
        f"mount --bind /etc/resolv.conf {r}/etc/resolv.conf",
    ]
    if binds:
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {r}/mnt")
    for inside, host in (binds or {}).items():
        if not inside.startswith("/mnt/") or ".." in inside:
            raise ValueError(f"bind target {inside} must be under /mnt")
        target = shlex.quote(f"{root}{inside}")
        lines.append(f"mkdir -p {target}")
        lines.append(f"mount --bind {shlex.quote(str(host))} {target}")
    environment = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", **(env or {})}
    inner = ["env", "-i", *(f"{k}={v}" for k, v in environment.items()), *argv]
    script = shlex.quote(f'cd {shlex.quote(cwd)} && exec "$@"')
    lines.append(f"exec chroot {r} /bin/sh -c {script} sh {shlex.join(inner)}")
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "/bin/sh",
        "-c",
        "\n".join(lines),
    ]
