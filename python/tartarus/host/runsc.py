"""Which runsc Tartarus runs, and the pinned build of it.

Debian 12's runsc (0.0~20221219) is too old for current kernels and userlands: it
rejects `statx` with `AT_NO_AUTOMOUNT` (so coreutils `ls /` fails with "Invalid
argument") and `--network=sandbox` does not start on 6.x kernels. `tartarus runsc
install` builds the pinned gVisor release from source with the Go toolchain, statically
(`CGO_ENABLED=0`: a dynamic runsc dies after `pivot_root`), into
`<cache>/runsc/<version>/runsc`.

runsc is looked for in this order: the `runsc` setting (`TARTARUS_RUNSC`), the cached
pinned build, then `runsc` on PATH.

The platform is probed, not assumed: systrap (faster, seccomp-based) where a trivial
container runs on it, ptrace otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec

from tartarus.errors import TartarusError

# The one pin of gVisor: a Go pseudo-version of gvisor.dev/gvisor (its `go` branch, which
# is what the Go module proxy serves). Read by `tartarus runsc install` and so by `make`.
RUNSC_VERSION: Final = "v0.0.0-20260905035102-160fafc42237"
RUNSC_PACKAGE: Final = "gvisor.dev/gvisor/runsc"
_VERSION_SYMBOL: Final = "gvisor.dev/gvisor/runsc/version.version"
# Builds on or before this date have the statx and network defects named below.
_DEFECTIVE_UNTIL: Final = 20221219
DEFECTS: Final = (
    "rejects statx with AT_NO_AUTOMOUNT (coreutils `ls /` fails: Invalid argument)",
    "--network=sandbox does not start on current kernels",
)
PROBE_TIMEOUT_S: Final = 30.0


class RunscError(TartarusError):
    pass


class RunscSource(enum.StrEnum):
    SETTING = "setting"
    PINNED = "pinned build"
    PATH = "PATH"


class Runsc(msgspec.Struct, frozen=True, kw_only=True):
    """The runsc in use: where it is, where it was found and what it says it is."""

    path: str
    source: RunscSource
    version: str
    # Why this build is known not to work well, empty when it is not known to be bad.
    degraded: list[str] = msgspec.field(default_factory=list)


class RunscBuild(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    version: str
    cached: bool
    seconds: float


class BuildEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One progress event: `phase` is download or compile; `done` counts its steps."""

    phase: str
    done: int
    detail: str = ""


ProgressCallback = Callable[[BuildEvent], None]


def pinned_dir(cache_dir: Path, version: str = RUNSC_VERSION) -> Path:
    return cache_dir / "runsc" / version


def pinned_path(cache_dir: Path, version: str = RUNSC_VERSION) -> Path:
    return pinned_dir(cache_dir, version) / "runsc"


def find_go() -> Path:
    found = shutil.which("go")
    if found:
        return Path(found)
    default = Path("/usr/local/go/bin/go")
    if default.is_file():
        return default
    raise RunscError("no Go toolchain: put `go` on PATH or pass --go (https://go.dev/dl/)")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def build_runsc(
    cache_dir: Path,
    *,
    go: Path | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
    version: str = RUNSC_VERSION,
) -> RunscBuild:
    """Builds the pinned runsc into the cache, or returns the cached one at once.

    Concurrent callers wait on a per-version lock: one builds, the others reuse it. Go's
    module and build caches live under `<cache>/runsc/go`, so a rebuild is quicker."""
    target = pinned_path(cache_dir, version)
    started = time.perf_counter()
    root = cache_dir / "runsc"
    with _lock(root / f".lock-{version}"):
        if target.is_file() and not force:
            return RunscBuild(
                path=str(target), version=version, cached=True, seconds=_since(started)
            )
        go = go or find_go()
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{version}-", dir=root))
        try:
            _go_install(go, root / "go", scratch, version, progress)
            built = scratch / "runsc"
            if not built.is_file():
                raise RunscError(f"go install left no runsc in {scratch}")
            target.parent.mkdir(parents=True, exist_ok=True)
            built.replace(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return RunscBuild(path=str(target), version=version, cached=False, seconds=_since(started))


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _go_install(
    go: Path, go_root: Path, gobin: Path, version: str, progress: ProgressCallback | None
) -> None:
    env = {
        **os.environ,
        "GOPATH": str(go_root / "path"),
        "GOMODCACHE": str(go_root / "mod"),
        "GOCACHE": str(go_root / "cache"),
        "GOBIN": str(gobin),
        # Static: a dynamically linked runsc dies after pivot_root into the sandbox.
        "CGO_ENABLED": "0",
        "GOFLAGS": "",
    }
    command = [
        str(go),
        "install",
        "-v",
        "-ldflags",
        f"-X {_VERSION_SYMBOL}={version}",
        f"{RUNSC_PACKAGE}@{version}",
    ]
    counts = {"download": 0, "compile": 0}
    tail: list[str] = []
    with subprocess.Popen(
        command,
        cwd=gobin,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.strip()
            tail = [*tail[-19:], line]
            phase = "download" if line.startswith("go: downloading") else "compile"
            counts[phase] += 1
            if progress is not None:
                progress(BuildEvent(phase=phase, done=counts[phase], detail=line))
    if proc.returncode != 0:
        raise RunscError(
            f"building runsc {version} failed (go install exit {proc.returncode}):\n"
            + "\n".join(tail)
        )


def runsc_version(path: str) -> str:
    """The first line of `runsc --version`, e.g. `runsc version 0.0~20221219.0`."""
    proc = subprocess.run(
        [path, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
    )
    lines = proc.stdout.strip().splitlines()
    return lines[0].removeprefix("runsc version ").strip() if lines else ""


def _build_date(version: str) -> int | None:
    """The date a runsc version names: 0.0~20221219.0, v0.0.0-20260905035102-..., or
    release-20240101.0."""
    match = re.search(r"(?:~|-|release-)(\d{8})", version)
    return int(match.group(1)) if match else None


def known_defects(version: str) -> list[str]:
    date = _build_date(version)
    if date is not None and date <= _DEFECTIVE_UNTIL:
        return list(DEFECTS)
    return []


def locate_runsc(explicit: Path | None, cache_dir: Path) -> tuple[str, RunscSource] | None:
    """The runsc to use, and where it was found; None when there is none."""
    if explicit is not None:
        return str(explicit), RunscSource.SETTING
    pinned = pinned_path(cache_dir)
    if pinned.is_file() and os.access(pinned, os.X_OK):
        return str(pinned), RunscSource.PINNED
    on_path = shutil.which("runsc")
    if on_path is not None:
        return on_path, RunscSource.PATH
    return None


def resolve_runsc(explicit: Path | None, cache_dir: Path) -> Runsc:
    found = locate_runsc(explicit, cache_dir)
    if found is None:
        raise RunscError(
            "no runsc: run `tartarus runsc install` (builds the pinned gVisor), "
            "set `runsc` in the config, or apt-get install runsc"
        )
    path, source = found
    if source is RunscSource.SETTING and not os.access(path, os.X_OK):
        raise RunscError(f"the runsc setting names {path}, which is not an executable file")
    version = runsc_version(path)
    return Runsc(path=path, source=source, version=version, degraded=known_defects(version))


NULL_NETNS: Final = "null-netns"
_MNT_DETACH: Final = 2


def unmount_null_netns(state_root: Path) -> None:
    """Unmounts the empty network namespace current runsc pins (bind-mounted) at
    `<--root>/null-netns` for `--network=none` sandboxes; a runsc root cannot be removed
    (EBUSY) while it is mounted. Concurrent runsc runs can stack mounts: all go."""
    path = state_root / NULL_NETNS
    if not path.exists():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    target = os.fsencode(path)
    while libc.umount2(target, _MNT_DETACH) == 0:
        pass


class Platform(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    reason: str


def global_flags(state_root: Path, platform: str) -> list[str]:
    """Flags every runsc invocation needs here: the platform, a private state root."""
    flags = ["--root", str(state_root), f"--platform={platform}", "--network=none"]
    if os.geteuid() != 0:
        flags += ["--rootless", "--ignore-cgroups"]
    return flags


@functools.cache
def probe_platform(runsc: str) -> Platform:
    """systrap when `runsc --platform=systrap do true` runs, ptrace otherwise (cached
    per runsc for the life of the process)."""
    with tempfile.TemporaryDirectory(prefix="tartarus-runsc-probe-") as tmp:
        command = [runsc, *global_flags(Path(tmp), "systrap"), "do", "true"]
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
                check=False,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            return Platform(
                name="ptrace", reason=f"systrap probe did not finish in {PROBE_TIMEOUT_S:.0f} s"
            )
        finally:
            unmount_null_netns(Path(tmp))
        elapsed = time.perf_counter() - started
    if proc.returncode == 0:
        return Platform(
            name="systrap", reason=f"`runsc do true` ran on systrap ({elapsed * 1000:.0f} ms)"
        )
    err = proc.stderr.strip().splitlines()
    last = err[-1][-200:] if err else f"exit {proc.returncode}"
    return Platform(name="ptrace", reason=f"systrap probe failed: {last}")
