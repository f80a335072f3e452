"""The selector: auto picks the strongest backend the host runs and explains itself;
a requested backend the host cannot run is a clear error naming what is missing."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import msgspec
import pytest

from tartarus.config import Settings
from tartarus.host.doctor import BackendVerdict, DoctorReport
from tartarus.node.provider import REAPED, HostRuntimes
from tartarus.runtime.base import BackendUnavailableError, NotSupportedError
from tartarus.runtime.selector import make_runtime, select_backend, select_runtime
from tartarus.runtime.types import Backend, SandboxSpec, TrustLevel


def with_verdicts(report: DoctorReport, **available: bool) -> DoctorReport:
    """The host's real report with some verdicts overridden (to walk every branch)."""
    backends = [
        BackendVerdict(b.name, available[b.name], f"{b.name} says {available[b.name]}")
        if b.name in available
        else b
        for b in report.backends
    ]
    return msgspec.structs.replace(report, backends=backends)


def test_wasm_module_goes_to_wasm(doctor_report: DoctorReport) -> None:
    report = with_verdicts(doctor_report, wasm=True, gvisor=True)
    backend, why = select_backend(SandboxSpec(id="x", wasm_module=Path("m.wasm")), report)
    assert backend is Backend.WASM
    assert "WebAssembly module" in why[0]


def test_auto_prefers_microvm_then_gvisor_then_jail(doctor_report: DoctorReport) -> None:
    spec = SandboxSpec(id="x", trust=TrustLevel.TRUSTED)
    report = with_verdicts(doctor_report, microvm=True, gvisor=True, jail=True)
    assert select_backend(spec, report)[0] is Backend.MICROVM
    report = with_verdicts(doctor_report, microvm=False, gvisor=True, jail=True)
    backend, why = select_backend(spec, report)
    assert backend is Backend.GVISOR
    assert why[1] == "microvm: unavailable, microvm says False"
    report = with_verdicts(doctor_report, microvm=False, gvisor=False, jail=True)
    assert select_backend(spec, report)[0] is Backend.JAIL


def test_untrusted_work_skips_the_jail_unless_policy_allows(doctor_report: DoctorReport) -> None:
    report = with_verdicts(doctor_report, microvm=False, gvisor=False, jail=True)
    spec = SandboxSpec(id="x")
    with pytest.raises(BackendUnavailableError, match="untrusted"):
        select_backend(spec, report)
    backend, why = select_backend(spec, report, allow_jail_untrusted=True)
    assert backend is Backend.JAIL
    assert any("allowed for untrusted work by policy" in line for line in why)


def test_requested_backend_the_host_cannot_run_names_what_is_missing(
    doctor_report: DoctorReport,
) -> None:
    report = with_verdicts(doctor_report, gvisor=False)
    with pytest.raises(BackendUnavailableError, match=r"gvisor backend cannot run.*gvisor says"):
        select_backend(SandboxSpec(id="x", backend=Backend.GVISOR), report)
    with pytest.raises(BackendUnavailableError, match=r"needs a \.wasm module"):
        select_backend(SandboxSpec(id="x", backend=Backend.WASM), doctor_report)


def test_real_host_verdicts(doctor_report: DoctorReport, tmp_path: Path) -> None:
    """On this host: the microvm request fails with the doctor's KVM reason when KVM
    cannot run full guests; auto picks a backend the doctor says is available."""
    if not doctor_report.kernel.kvm.full_guests:
        with pytest.raises(BackendUnavailableError, match="KVM"):
            select_backend(SandboxSpec(id="x", backend=Backend.MICROVM), doctor_report)
    settings = Settings(runtime_dir=tmp_path)
    try:
        selection = select_runtime(SandboxSpec(id="x"), doctor_report, settings)
    except BackendUnavailableError as e:
        assert "no backend" in str(e)
        return
    assert doctor_report.backend(selection.backend.value).available
    assert selection.runtime.backend is selection.backend
    assert selection.explanation[-1].startswith(f"{selection.backend.value}: chosen")


def test_every_reaped_backend_is_made_and_reaps_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node agent reaps every backend when it starts: each must instantiate (by its
    real class name) and reap an empty state without an error in the log."""
    settings = Settings(
        runtime_dir=tmp_path / "run", state_dir=tmp_path / "state", cache_dir=tmp_path / "cache"
    )
    for backend in REAPED:
        runtime = make_runtime(backend, settings)
        assert runtime.backend is backend
        assert anyio.run(runtime.reap, set()) == []
    with caplog.at_level(logging.ERROR):
        assert anyio.run(HostRuntimes(settings).reap_all) == set()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.kvm_full
def test_a_host_whose_kvm_runs_full_guests_gets_microvm() -> None:
    """Runs where KVM runs Linux guests (the nested-KVM lane's L1): the doctor's own probe
    says so, and auto picks microvm from that real report."""
    from tartarus.config import load_settings  # noqa: PLC0415
    from tartarus.host.doctor import run_doctor  # noqa: PLC0415

    report = run_doctor(load_settings())
    assert report.kernel.kvm.full_guests, report.kernel.kvm
    assert report.backend("microvm").available, report.backend("microvm")
    assert report.best_backend == "microvm"
    spec = SandboxSpec(id="x", trust=TrustLevel.TRUSTED)
    assert select_backend(spec, report)[0] is Backend.MICROVM


def test_a_network_grant_goes_to_a_backend_with_a_network(doctor_report: DoctorReport) -> None:
    """microvm guests have no network device yet: auto passes over microvm, and says so,
    rather than start a sandbox whose grant is silently dropped."""
    report = with_verdicts(doctor_report, microvm=True, gvisor=True, jail=True)
    spec = SandboxSpec(id="x", network=True)
    backend, why = select_backend(spec, report)
    assert backend is Backend.GVISOR
    assert "microvm: skipped, the sandbox asks for a network and microvm has none" in why
    assert select_backend(SandboxSpec(id="x"), report)[0] is Backend.MICROVM


@pytest.mark.parametrize("backend", [Backend.MICROVM, Backend.WASM])
def test_a_network_grant_is_refused_where_there_is_no_network(
    doctor_report: DoctorReport, backend: Backend
) -> None:
    report = with_verdicts(doctor_report, microvm=True, wasm=True)
    module = Path("m.wasm") if backend is Backend.WASM else None
    requested = SandboxSpec(id="x", backend=backend, network=True, wasm_module=module)
    with pytest.raises(
        NotSupportedError, match=f"the {backend.value} backend does not support network"
    ):
        select_backend(requested, report)
    if backend is Backend.WASM:  # auto sends a module to wasm, which refuses the grant too
        with pytest.raises(NotSupportedError, match="use the gvisor or jail backend"):
            select_backend(SandboxSpec(id="x", network=True, wasm_module=module), report)


@pytest.mark.anyio
@pytest.mark.parametrize("backend", [Backend.MICROVM, Backend.WASM])
async def test_the_runtimes_refuse_a_network_grant_themselves(
    backend: Backend, tmp_path: Path
) -> None:
    module = tmp_path / "m.wasm"
    module.write_bytes(b"\0asm\1\0\0\0")
    runtime = make_runtime(backend, Settings(runtime_dir=tmp_path / "run"))
    spec = SandboxSpec(id="x", backend=backend, network=True, wasm_module=module)
    with pytest.raises(NotSupportedError, match="does not support network"):
        await runtime.create(spec)
    assert not (tmp_path / "run" / "sandboxes" / "x").exists()
