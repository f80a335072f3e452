"""Which runsc Tartarus runs, and the pinned build of it.

Debian 12's runsc (0.0~20221219) is too old for current kernels and userlands: it
rejects `statx` with `AT_NO_AUTOMOUNT` (so coreutils `ls /` fails with "Invalid
argument") and `--network=sandbox` does not start on 6.x kernels. `tartarus runsc
install` builds the pinned gVisor release from source with the Go toolchain, statically
(`CGO_ENABLED=0`: a dynamic runsc dies after `pivot_root`), into
`<cache>/runsc/<version>/runsc`.

That gVisor needs Go 1.26.3 or newer. An older local go (Debian 12's golang-go is 1.19)
only fetches the pinned Go toolchain, `golang.org/toolchain` from the Go module proxy:
the module Go's own switching (`GOTOOLCHAIN`, Go 1.21+) downloads, fetched with `go mod
download` because Go 1.19 ignores `GOTOOLCHAIN`. It lands in the runsc build's module
cache, `<cache>/runsc/go/mod`.

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
# gVisor's go.mod at RUNSC_VERSION says `go 1.26.3`: an older Go cannot build it.
RUNSC_GO_MIN: Final = (1, 26, 3)
# The Go used when the local one is older than RUNSC_GO_MIN: the version the Go module
# proxy serves here as golang.org/toolchain (76 MB zip, ~320 MB unpacked).
GO_TOOLCHAIN: Final = "go1.27.3"
_GO_TIMEOUT_S: Final = 900.0


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
    # The Go that built it (e.g. go1.26.8); empty for a cache hit.
    go: str = ""


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


def go_candidates() -> list[Path]:
    """The Go installs to look at, in order: `go` on PATH, the tarball install's
    /usr/local/go."""
    found: list[Path] = []
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and Path(candidate).is_file() and Path(candidate) not in found:
            found.append(Path(candidate))
    return found


def find_go() -> Path:
    """The first Go of `go_candidates`. Any Go with modules will do: one too old for
    gVisor fetches the toolchain that builds it."""
    candidates = go_candidates()
    if not candidates:
        raise RunscError(
            "no Go toolchain: apt-get install golang-go (Debian's Go fetches the Go that"
            " builds runsc), put `go` on PATH, or pass --go"
        )
    return candidates[0]


def _go_env(go_root: Path) -> dict[str, str]:
    """Go's caches under `go_root`, and exactly the toolchain asked for: no switching
    (GOTOOLCHAIN=local) and no GOROOT from the caller naming another Go."""
    env = {k: v for k, v in os.environ.items() if k != "GOROOT"}
    return {
        **env,
        "GOPATH": str(go_root / "path"),
        "GOMODCACHE": str(go_root / "mod"),
        "GOCACHE": str(go_root / "cache"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
    }


def _go(go: Path, go_root: Path, *args: str) -> str:
    go_root.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [str(go), *args],
            cwd=go_root,
            env=_go_env(go_root),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_GO_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunscError(f"`{go} {' '.join(args)}` failed: {e}") from e
    if proc.returncode != 0:
        raise RunscError(
            f"`{go} {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-800:]}"
        )
    return proc.stdout


def parse_go_version(text: str) -> tuple[int, int, int]:
    """(1, 19, 8) from `go1.19.8`; a release candidate (`go1.22rc1`) counts as x.y.0."""
    match = re.search(r"go(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise RunscError(f"not a Go version: {text!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def go_version(go: Path, go_root: Path) -> str:
    return _go(go, go_root, "env", "GOVERSION").strip()


def fetch_toolchain(
    go: Path, go_root: Path, version: str = GO_TOOLCHAIN, progress: ProgressCallback | None = None
) -> Path:
    """The `go` of toolchain `version`, fetched by `go` (any version that has modules) as
    the module golang.org/toolchain into `go_root`'s module cache; instant when there."""
    goos, goarch = _go(go, go_root, "env", "GOHOSTOS", "GOHOSTARCH").split()
    module = f"golang.org/toolchain@v0.0.1-{version}.{goos}-{goarch}"
    if progress is not None:
        progress(BuildEvent(phase="toolchain", done=0, detail=f"go mod download {module}"))
    info = msgspec.json.decode(_go(go, go_root, "mod", "download", "-json", module))
    root = Path(info["Dir"])
    # Module zips carry no modes: the files unpack read-only, not executable. Go's own
    # toolchain switch sets the execute bits on the same two directories.
    for tools in (root / "bin", root / "pkg" / "tool" / f"{goos}_{goarch}"):
        for f in tools.iterdir():
            if f.is_file():
                f.chmod(f.stat().st_mode | 0o111)
    found = root / "bin" / "go"
    if progress is not None:
        progress(BuildEvent(phase="toolchain", done=1, detail=f"{version}: {found}"))
    return found


def toolchain_for_runsc(
    go: Path | None, go_root: Path, progress: ProgressCallback | None = None
) -> tuple[Path, str]:
    """`go` when it can build the pinned gVisor, else the fetched GO_TOOLCHAIN; with
    the version of the one returned. Without `go`: the first of `go_candidates` new
    enough, so Debian's 1.19 earlier on PATH does not hide a newer /usr/local/go."""
    for candidate in [go] if go is not None else go_candidates():
        have = go_version(candidate, go_root)
        if parse_go_version(have) >= RUNSC_GO_MIN:
            return candidate, have
    fetched = fetch_toolchain(go or find_go(), go_root, GO_TOOLCHAIN, progress)
    return fetched, go_version(fetched, go_root)


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
        go, go_used = toolchain_for_runsc(go, root / "go", progress)
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
    return RunscBuild(
        path=str(target), version=version, cached=False, seconds=_since(started), go=go_used
    )


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 3)


def _go_install(
    go: Path, go_root: Path, gobin: Path, version: str, progress: ProgressCallback | None
) -> None:
    env = {
        **_go_env(go_root),
        "GOBIN": str(gobin),
        # Static: a dynamically linked runsc dies after pivot_root into the sandbox.
        "CGO_ENABLED": "0",
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
