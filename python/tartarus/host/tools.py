"""Checks of the programs and libraries the backends drive: runsc and wasmtime.

Each check runs the tool for real (a container under runsc, a module under wasmtime)
because "installed" and "works here" are different facts.
"""

from __future__ import annotations

import os
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
from tartarus.runtime.oci_spec import Process, Root, Spec, write_bundle_config

RUNSC_TIMEOUT_S = 60.0


class ToolCheck(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    available: bool
    detail: str
    path: str | None = None
    version: str | None = None
    seconds: float | None = None


def runsc_global_flags(state_root: Path) -> list[str]:
    """Flags every runsc invocation needs here: ptrace platform, private state root."""
    flags = ["--root", str(state_root), "--platform=ptrace", "--network=none"]
    if os.geteuid() != 0:
        flags += ["--rootless", "--ignore-cgroups"]
    return flags


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def check_runsc() -> ToolCheck:
    """Runs `tartarus-agent --version` in a throwaway gVisor sandbox (ptrace platform)."""
    runsc = shutil.which("runsc")
    if runsc is None:
        return ToolCheck(
            name="runsc", available=False, detail="runsc not on PATH (apt-get install runsc)"
        )
    version = _first_line(
        subprocess.run([runsc, "--version"], capture_output=True, text=True, check=False).stdout
    )
    try:
        agent = find_binary("tartarus-agent")
    except BinaryNotFoundError as e:
        return ToolCheck(name="runsc", available=False, path=runsc, version=version, detail=str(e))
    with tempfile.TemporaryDirectory(prefix="tartarus-doctor-") as tmp:
        bundle = Path(tmp) / "bundle"
        rootfs = bundle / "rootfs"
        rootfs.mkdir(parents=True)
        shutil.copy2(agent, rootfs / "tartarus-agent")
        spec = Spec(
            process=Process(args=["/tartarus-agent", "--version"]),
            root=Root(path=str(rootfs)),
        )
        write_bundle_config(bundle, spec)
        state = Path(tmp) / "state"
        state.mkdir()
        container = f"doctor-{uuid.uuid4().hex[:12]}"
        cmd = [runsc, *runsc_global_flags(state), "run", "--bundle", str(bundle), container]
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=RUNSC_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired:
            subprocess.run(
                [runsc, "--root", str(state), "delete", "--force", container],
                capture_output=True,
                check=False,
            )
            return ToolCheck(
                name="runsc",
                available=False,
                path=runsc,
                version=version,
                detail=f"runsc run did not finish within {RUNSC_TIMEOUT_S:.0f} s",
            )
        elapsed = time.perf_counter() - started
    works = proc.returncode == 0 and "tartarus-agent" in proc.stdout
    detail = (
        "runs containers with --platform=ptrace"
        if works
        else f"runsc run exited {proc.returncode}: {proc.stderr.strip()[-400:]}"
    )
    return ToolCheck(
        name="runsc",
        available=works,
        path=runsc,
        version=version,
        detail=detail,
        seconds=round(elapsed, 4),
    )


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
