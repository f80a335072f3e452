"""Picks the backend for a sandbox: `auto` walks the backends strongest first and takes
the first one this host can run (the doctor's verdicts), that suits the workload (a
`.wasm` module goes to wasm) and that the trust level allows (the jail only takes
untrusted work when policy says so). Every decision comes with its reasons, which
`tartarus run --explain` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tartarus.config import Settings
from tartarus.host.doctor import LINUX_BACKENDS, DoctorReport
from tartarus.runtime.base import NETWORKED, BackendUnavailableError, Runtime, refuse_network
from tartarus.runtime.types import Backend, SandboxSpec, TrustLevel

WASM_SUFFIXES = (".wasm", ".wat")


@dataclass(frozen=True)
class Selection:
    backend: Backend
    runtime: Runtime
    # One line per backend considered: "gvisor: chosen, runs containers with ...".
    explanation: list[str] = field(default_factory=list)


def sandbox_state_dir(settings: Settings) -> Path:
    """Where backends keep per-sandbox files (sockets, bundles, scratch): per boot."""
    return settings.runtime_dir / "sandboxes"


def make_runtime(backend: Backend, settings: Settings, *, outlive_server: bool = True) -> Runtime:
    """Instantiates one backend (no availability check). `outlive_server`: the jail's
    sandboxes run on when the server dies (a restart re-attaches to them), or end."""
    state = sandbox_state_dir(settings)
    if backend is Backend.WASM:
        from tartarus.runtime.wasm import WasmRuntime  # noqa: PLC0415 - wasmtime loads on demand

        return WasmRuntime(state)
    if backend is Backend.JAIL:
        from tartarus.runtime.jail import JailRuntime  # noqa: PLC0415

        return JailRuntime(state, network=settings.network, outlive_host=outlive_server)
    if backend is Backend.GVISOR:
        from tartarus.runtime.gvisor import GvisorRuntime  # noqa: PLC0415

        return GvisorRuntime(
            state, runsc=settings.runsc, cache_dir=settings.cache_dir, network=settings.network
        )
    if backend is Backend.MICROVM:
        from tartarus.runtime.microvm import MicroVmRuntime  # noqa: PLC0415

        return MicroVmRuntime(settings=settings)
    raise BackendUnavailableError(f"{backend.value} is not a backend that can be instantiated")


def is_wasm_workload(spec: SandboxSpec) -> bool:
    return spec.wasm_module is not None and spec.wasm_module.suffix in WASM_SUFFIXES


def select_backend(
    spec: SandboxSpec, report: DoctorReport, *, allow_jail_untrusted: bool = False
) -> tuple[Backend, list[str]]:
    """Decides the backend and says why, or raises `BackendUnavailableError` naming
    what is missing."""
    if spec.backend is not Backend.AUTO:
        return _check_requested(spec, report)
    if is_wasm_workload(spec):
        refuse_network(spec, Backend.WASM)
        verdict = report.backend(Backend.WASM.value)
        if not verdict.available:
            raise BackendUnavailableError(
                f"the workload is a WebAssembly module but wasm cannot run here: {verdict.reason}"
            )
        return Backend.WASM, [
            f"wasm: chosen, the workload is a WebAssembly module ({spec.wasm_module})"
        ]
    lines = ["wasm: skipped, the workload is not a .wasm module"]
    for name in LINUX_BACKENDS:
        verdict = report.backend(name)
        if not verdict.available:
            lines.append(f"{name}: unavailable, {verdict.reason}")
            continue
        if spec.network and Backend(name) not in NETWORKED:
            lines.append(f"{name}: skipped, the sandbox asks for a network and {name} has none")
            continue
        if name == Backend.JAIL.value and spec.trust is not TrustLevel.TRUSTED:
            if not allow_jail_untrusted:
                lines.append(
                    "jail: skipped, the workload is untrusted and policy keeps untrusted code"
                    " out of the jail (shared kernel); use --trust trusted or a stronger backend"
                )
                continue
            lines.append("jail: allowed for untrusted work by policy")
        lines.append(f"{name}: chosen, {verdict.reason}")
        return Backend(name), lines
    raise BackendUnavailableError(
        "no backend on this host can run this sandbox:\n  " + "\n  ".join(lines)
    )


def _check_requested(spec: SandboxSpec, report: DoctorReport) -> tuple[Backend, list[str]]:
    backend = spec.backend
    verdict = report.backend(backend.value)
    if not verdict.available:
        raise BackendUnavailableError(
            f"the {backend.value} backend cannot run on this host: {verdict.reason}"
        )
    if backend is Backend.WASM and spec.wasm_module is None:
        raise BackendUnavailableError("the wasm backend needs a .wasm module to run")
    if backend is not Backend.WASM and spec.wasm_module is not None:
        raise BackendUnavailableError(
            f"a WebAssembly module runs on the wasm backend, not {backend.value}"
        )
    refuse_network(spec, backend)
    lines = [f"{backend.value}: requested, {verdict.reason}"]
    if backend is Backend.JAIL and spec.trust is not TrustLevel.TRUSTED:
        lines.append("jail: note, untrusted code shares the host kernel in the jail")
    return backend, lines


def select_runtime(
    spec: SandboxSpec,
    report: DoctorReport,
    settings: Settings,
    *,
    allow_jail_untrusted: bool = False,
) -> Selection:
    """The runtime to use and why (one line per backend considered)."""
    backend, lines = select_backend(spec, report, allow_jail_untrusted=allow_jail_untrusted)
    return Selection(backend=backend, runtime=make_runtime(backend, settings), explanation=lines)
