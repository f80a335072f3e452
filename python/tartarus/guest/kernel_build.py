"""Builds the guest kernel reproducibly and caches it by the hash of its inputs.

Inputs: Debian's `linux-source-6.1` tarball (by sha256), the committed config
fragments, the compiler's version and this builder's version. Same inputs, same cache
entry: `<cache_dir>/kernels/<id>/` holding `vmlinux` (an ELF with a PVH note, what the
VMM loads), `config` (the final .config) and `manifest.json`. Build timestamps, user and
host are pinned (`KBUILD_BUILD_*`) so two builds of the same inputs match.

The build itself: unpack the tarball into a scratch directory next to the cache,
`make tinyconfig`, merge the fragments, `make olddefconfig`, refuse to go on if any
required option was dropped, `make -jN vmlinux`, then move the results into place
atomically and delete the scratch tree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

from tartarus.errors import TartarusError
from tartarus.guest import kernel_config
from tartarus.guest.kernel_config import ConfigOption, Mismatch

DEFAULT_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
# Bump when the build recipe changes in a way that changes the output.
BUILDER_VERSION = "1"
# Compile steps of the last measured build; only used for the progress bar's first run.
ESTIMATED_STEPS = 1450
PINNED_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01T00:00:00Z",
    "KBUILD_BUILD_USER": "tartarus",
    "KBUILD_BUILD_HOST": "tartarus",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
    "TZ": "UTC",
}


class KernelBuildError(TartarusError):
    """The guest kernel could not be built; the message says which step failed."""


class KernelNotFoundError(TartarusError):
    """No cached kernel matches the request."""


class KernelInputs(msgspec.Struct, frozen=True, kw_only=True):
    source: str
    source_sha256: str
    fragments_sha256: str
    compiler: str
    arch: str
    builder_version: str

    def kernel_id(self) -> str:
        return hashlib.sha256(msgspec.json.encode(self)).hexdigest()[:16]


class KernelManifest(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    kernel_release: str
    inputs: KernelInputs
    vmlinux_sha256: str
    vmlinux_bytes: int
    built_at: str
    build_seconds: float
    compile_steps: int


class BuildProgress(msgspec.Struct, frozen=True, kw_only=True):
    """One progress event: `phase` is unpack, configure, compile or install."""

    phase: str
    done: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[BuildProgress], None]


def kernels_dir(cache_dir: Path) -> Path:
    return cache_dir / "kernels"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _compiler_version() -> str:
    try:
        out = subprocess.run(
            ["gcc", "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run gcc (apt-get install build-essential): {e}") from e
    return out.splitlines()[0].strip()


def compute_inputs(source: Path = DEFAULT_SOURCE) -> KernelInputs:
    if not source.is_file():
        raise KernelBuildError(
            f"kernel source {source} not found (apt-get install linux-source-6.1)"
        )
    # The options, not the comments: rewording a `# why` does not force a rebuild.
    rendered = kernel_config.render_kconfig(kernel_config.required_options())
    return KernelInputs(
        source=source.name,
        source_sha256=_sha256_file(source),
        fragments_sha256=hashlib.sha256(rendered.encode()).hexdigest(),
        compiler=_compiler_version(),
        arch=platform.machine(),
        builder_version=BUILDER_VERSION,
    )


def list_kernels(cache_dir: Path) -> list[KernelManifest]:
    """Every complete cached kernel, newest first."""
    found = []
    root = kernels_dir(cache_dir)
    if not root.is_dir():
        return []
    for entry in root.iterdir():
        manifest = entry / "manifest.json"
        if entry.name.startswith(".") or not manifest.is_file():
            continue
        try:
            found.append(msgspec.json.decode(manifest.read_bytes(), type=KernelManifest))
        except msgspec.DecodeError:
            continue
    return sorted(found, key=lambda m: m.built_at, reverse=True)


def kernel_dir(cache_dir: Path, kernel_id: str) -> Path:
    return kernels_dir(cache_dir) / kernel_id


def find_kernel(cache_dir: Path, kernel_id: str) -> KernelManifest:
    """The cached kernel with this id (a unique prefix is enough)."""
    matches = [m for m in list_kernels(cache_dir) if m.id.startswith(kernel_id)]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise KernelNotFoundError(
            f"{what} cached kernel matches {kernel_id!r} in {kernels_dir(cache_dir)}; "
            "see `tartarus kernel list`"
        )
    return matches[0]


def cached_kernel(cache_dir: Path, inputs: KernelInputs) -> KernelManifest | None:
    """The cached build of exactly these inputs, if there is one."""
    manifest = kernel_dir(cache_dir, inputs.kernel_id()) / "manifest.json"
    if not manifest.is_file():
        return None
    return msgspec.json.decode(manifest.read_bytes(), type=KernelManifest)


def verify_config(config: Path, options: list[ConfigOption] | None = None) -> list[Mismatch]:
    """Checks a kernel .config against the hardening list (or `options`)."""
    wanted = (
        options if options is not None else kernel_config.load_fragment(kernel_config.HARDENING)
    )
    return kernel_config.check(kernel_config.read_dotconfig(config), wanted)


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str], what: str, log: Path
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise KernelBuildError(f"{what} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return proc


def _unpack(source: Path, dest: Path, progress: ProgressCallback) -> Path:
    progress(BuildProgress(phase="unpack", done=0, total=1, detail=source.name))
    # The tarball is Debian's, but refuse anything that would land outside `dest`.
    try:
        with tarfile.open(source) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise KernelBuildError(f"cannot unpack {source}: {e}") from e
    trees = [p for p in dest.iterdir() if p.is_dir()]
    if len(trees) != 1:
        raise KernelBuildError(f"{source} does not unpack to a single source tree")
    progress(BuildProgress(phase="unpack", done=1, total=1, detail=source.name))
    return trees[0]


def _configure(tree: Path, env: dict[str, str], log: Path, progress: ProgressCallback) -> None:
    progress(BuildProgress(phase="configure", done=0, total=3, detail="tinyconfig"))
    _run(["make", "-s", "tinyconfig"], tree, env, "make tinyconfig", log)
    options = kernel_config.required_options()
    fragment = tree / "tartarus.config"
    fragment.write_text(kernel_config.render_kconfig(options))
    progress(BuildProgress(phase="configure", done=1, total=3, detail="merge fragments"))
    _run(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
        tree,
        env,
        "merge_config.sh",
        log,
    )
    progress(BuildProgress(phase="configure", done=2, total=3, detail="olddefconfig"))
    _run(["make", "-s", "olddefconfig"], tree, env, "make olddefconfig", log)
    dropped = kernel_config.check(kernel_config.read_dotconfig(tree / ".config"), options)
    if dropped:
        lines = "\n  ".join(m.describe() for m in dropped)
        raise KernelBuildError(
            "the kernel configuration dropped required options (unmet dependencies; "
            f"fix the fragments in tartarus/guest/configs):\n  {lines}"
        )
    progress(BuildProgress(phase="configure", done=3, total=3, detail="checked"))


def _compile(
    tree: Path,
    env: dict[str, str],
    *,
    jobs: int,
    log: Path,
    estimate: int,
    progress: ProgressCallback,
) -> int:
    steps = 0
    progress(BuildProgress(phase="compile", done=0, total=estimate))
    with log.open("a") as f:
        proc = subprocess.Popen(
            ["make", f"-j{jobs}", "vmlinux"],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            # kbuild prints one "  CC      path" line per step.
            if line.startswith("  ") and line[2:3].isupper():
                steps += 1
                progress(
                    BuildProgress(
                        phase="compile",
                        done=min(steps, estimate),
                        total=max(estimate, steps),
                        detail=line.split()[-1],
                    )
                )
        code = proc.wait()
    if code != 0:
        raise KernelBuildError(f"make vmlinux failed (exit {code}); see {log}")
    progress(BuildProgress(phase="compile", done=steps, total=steps, detail="vmlinux"))
    return steps


def _no_progress(_: BuildProgress) -> None:
    return None


def build_kernel(
    cache_dir: Path,
    *,
    source: Path = DEFAULT_SOURCE,
    jobs: int | None = None,
    force: bool = False,
    progress: ProgressCallback = _no_progress,
) -> KernelManifest:
    """Returns the cached kernel for the current inputs, building it if needed.

    Concurrent callers wait on a per-kernel lock: one builds, the others reuse it.
    """
    inputs = compute_inputs(source)
    if not force and (existing := cached_kernel(cache_dir, inputs)) is not None:
        return existing
    with _build_lock(cache_dir, inputs.kernel_id()):
        if not force and (existing := cached_kernel(cache_dir, inputs)) is not None:
            return existing
        return _build_locked(cache_dir, inputs, source, jobs, progress)


@contextlib.contextmanager
def _build_lock(cache_dir: Path, kernel_id: str) -> Iterator[None]:
    root = kernels_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".lock-{kernel_id}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_locked(
    cache_dir: Path,
    inputs: KernelInputs,
    source: Path,
    jobs: int | None,
    progress: ProgressCallback,
) -> KernelManifest:
    for tool in ("make", "gcc", "flex", "bison", "bc"):
        if shutil.which(tool) is None:
            raise KernelBuildError(
                f"{tool} not found; install the kernel build dependencies listed in "
                "scripts/system-packages.txt"
            )
    root = kernels_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    previous = list_kernels(cache_dir)
    estimate = previous[0].compile_steps if previous else ESTIMATED_STEPS
    env = {**os.environ, **PINNED_ENV}
    started = time.monotonic()
    # We hold this kernel's lock: scratch trees left by a killed build are garbage.
    for stale in root.glob(f".build-{inputs.kernel_id()}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(
        prefix=f".build-{inputs.kernel_id()}-", dir=root
    ) as scratch_name:
        scratch = Path(scratch_name)
        log = scratch / "build.log"
        tree = _unpack(source, scratch / "src", progress)
        _configure(tree, env, log, progress)
        steps = _compile(
            tree,
            env,
            jobs=jobs or os.cpu_count() or 1,
            log=log,
            estimate=estimate,
            progress=progress,
        )
        progress(BuildProgress(phase="install", done=0, total=1))
        release = _run(
            ["make", "-s", "kernelrelease"], tree, env, "make kernelrelease", log
        ).stdout.strip()
        staged = scratch / "out"
        staged.mkdir()
        shutil.copy2(tree / "vmlinux", staged / "vmlinux")
        shutil.copy2(tree / ".config", staged / "config")
        shutil.copy2(log, staged / "build.log")
        vmlinux = staged / "vmlinux"
        manifest = KernelManifest(
            id=inputs.kernel_id(),
            kernel_release=release,
            inputs=inputs,
            vmlinux_sha256=_sha256_file(vmlinux),
            vmlinux_bytes=vmlinux.stat().st_size,
            built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            build_seconds=round(time.monotonic() - started, 1),
            compile_steps=steps,
        )
        (staged / "manifest.json").write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
        final = kernel_dir(cache_dir, manifest.id)
        if final.exists():
            shutil.rmtree(final)
        # Same filesystem (the scratch dir is inside the cache): the rename is atomic.
        staged.rename(final)
        progress(BuildProgress(phase="install", done=1, total=1, detail=str(final)))
    return manifest
