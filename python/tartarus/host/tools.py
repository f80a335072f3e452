"""Checks of the programs and libraries the backends drive: runsc and wasmtime.

Each check runs the tool for real (a container under runsc, a module under wasmtime)
because "installed" and "works here" are different facts.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import msgspec

from tartarus.binaries import find_binary
from tartarus.errors import BinaryNotFoundError
from tartarus.host.runsc import (
    RunscError,
    global_flags,
    probe_platform,
    resolve_runsc,
    unmount_null_netns,
)
from tartarus.runtime.oci_spec import Process, Root, Spec, write_bundle_config

RUNSC_TIMEOUT_S = 60.0


class ToolCheck(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    available: bool
    detail: str
    path: str | None = None
    version: str | None = None
    seconds: float | None = None
    # runsc only: where it was found (setting, pinned build, PATH), the platform the probe
    # chose and why, and the known defects of this build (empty: none known).
    source: str | None = None
    platform: str | None = None
    platform_reason: str | None = None
    degraded: list[str] = msgspec.field(default_factory=list)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def check_runsc(explicit: Path | None, cache_dir: Path) -> ToolCheck:
    """Finds runsc (setting, pinned build, PATH), probes its platform, then runs
    `tartarus-agent --version` in a throwaway gVisor sandbox on that platform."""
    try:
        runsc = resolve_runsc(explicit, cache_dir)
    except RunscError as e:
        return ToolCheck(name="runsc", available=False, detail=str(e))
    platform = probe_platform(runsc.path)

    def result(available: bool, detail: str, seconds: float | None = None) -> ToolCheck:
        return ToolCheck(
            name="runsc",
            available=available,
            detail=detail,
            path=runsc.path,
            version=runsc.version,
            seconds=seconds,
            source=runsc.source.value,
            platform=platform.name,
            platform_reason=platform.reason,
            degraded=runsc.degraded,
        )

    try:
        agent = find_binary("tartarus-agent")
    except BinaryNotFoundError as e:
        return result(False, str(e))
    with tempfile.TemporaryDirectory(prefix="tartarus-doctor-") as tmp:
        bundle = Path(tmp) / "bundle"
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        shutil.copy2(agent, rootfs / "tartarus-agent")
        spec = Spec(
            process=Process(args=["/tartarus-agent", "--version"], cwd="/"),
            root=Root(path=str(rootfs)),
        )
        write_bundle_config(bundle, spec)
        state = Path(tmp) / "state"
        state.mkdir()
        container = f"doctor-{uuid.uuid4().hex[:12]}"
        flags = global_flags(state, platform.name)
        cmd = [runsc.path, *flags, "run", "--bundle", str(bundle), container]
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=RUNSC_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            subprocess.run(
                [runsc.path, "--root", str(state), "delete", "--force", container],
                capture_output=True,
                check=False,
            )
            return result(False, f"runsc run did not finish within {RUNSC_TIMEOUT_S:.0f} s")
        finally:
            unmount_null_netns(state)
        elapsed = time.perf_counter() - started
    works = proc.returncode == 0 and "tartarus-agent" in proc.stdout
    if not works:
        detail = f"runsc run exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
    else:
        detail = f"runs containers with --platform={platform.name} ({platform.reason})"
    detail += f"; {runsc.source.value}: {runsc.path}"
    if runsc.degraded:
        detail += (
            f"; DEGRADED, an old runsc ({runsc.version}): {'; '.join(runsc.degraded)};"
            " `tartarus runsc install` builds the pinned one"
        )
    return result(works, detail, round(elapsed, 4))


_ANSWER_WAT = '(module (func (export "answer") (result i32) i32.const 42))'


def check_wasmtime() -> ToolCheck:
    """Imports wasmtime, compiles a tiny module and calls it."""
    try:
        import wasmtime  # noqa: PLC0415 - optional at import time, reported when broken
    except ImportError as e:
        return ToolCheck(name="wasmtime", available=False, detail=f"cannot import wasmtime: {e}")
    version = metadata.version("wasmtime")
    started = time.perf_counter()
    store = wasmtime.Store()
    module = wasmtime.Module(store.engine, _ANSWER_WAT)
    instance = wasmtime.Instance(store, module, [])
    answer = instance.exports(store)["answer"]
    assert isinstance(answer, wasmtime.Func)
    result = answer(store)
    elapsed = time.perf_counter() - started
    works = result == 42
    return ToolCheck(
        name="wasmtime",
        available=works,
        version=version,
        detail="compiles and runs WASI modules" if works else f"test module returned {result!r}",
        seconds=round(elapsed, 6),
    )
