"""The doctor's verdicts agree with independent checks done here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import wasmtime

from tartarus.host.doctor import DoctorReport, check_egress_filter
from tartarus.host.kernel import CgroupMode, KvmFlavour
from tartarus.network.ebpf import EbpfEnforcer
from tartarus.network.settings import EnforcerChoice, NetworkSettings
from tests.support import kvm_int3

TARTARUS = str(Path(sys.executable).parent / "tartarus")


def test_kvm_verdict_matches_independent_int3_probe(doctor_report: DoctorReport) -> None:
    kvm = doctor_report.kernel.kvm
    if not Path("/dev/kvm").exists():
        assert kvm.flavour is KvmFlavour.UNAVAILABLE
        assert not kvm.full_guests
        return
    assert kvm.device_present
    delivered = kvm_int3.exceptions_delivered()
    assert kvm.exception_delivered == delivered
    assert kvm.full_guests == delivered
    expected = KvmFlavour.HARDWARE if delivered else KvmFlavour.EMULATED
    assert kvm.flavour is expected
    if not delivered:
        reason, _ = kvm_int3.int3_exit()
        assert reason == kvm_int3.EXIT_INTERNAL_ERROR
        assert "INTERNAL_ERROR" in kvm.exit


def test_microvm_backend_follows_full_guest_verdict(doctor_report: DoctorReport) -> None:
    microvm = doctor_report.backend("microvm")
    if not doctor_report.kernel.kvm.full_guests:
        assert not microvm.available
        assert "full guest" in microvm.reason


def _independent_runsc_echo(tmp_path: Path, runsc: str | None) -> bool:
    """Runs busybox echo under runsc (the one the doctor names, else PATH's) with a
    hand-written config, sharing no project code."""
    busybox = shutil.which("busybox")
    if runsc is None or busybox is None:
        return False
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    config = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/busybox", "echo", "independent"], "cwd": "/"},
        "root": {"path": str(rootfs), "readonly": True},
        "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "network")]},
    }
    (tmp_path / "bundle" / "config.json").write_text(json.dumps(config))
    state = tmp_path / "state"
    flags = ["--root", str(state), "--platform=ptrace", "--network=none"]
    if os.geteuid() != 0:
        flags += ["--rootless", "--ignore-cgroups"]
    proc = subprocess.run(
        [runsc, *flags, "run", "--bundle", str(tmp_path / "bundle"), f"t-{uuid.uuid4().hex[:8]}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Current runsc pins an empty netns at <root>/null-netns for --network=none.
    umount = ["umount", "-l", str(state / "null-netns")]
    while subprocess.run(umount, capture_output=True, check=False).returncode == 0:
        pass
    return proc.returncode == 0 and "independent" in proc.stdout


def test_runsc_verdict_matches_independent_run(doctor_report: DoctorReport, tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("busybox not on PATH (apt-get install busybox-static)")
    runsc = doctor_report.tool("runsc").path or shutil.which("runsc")
    assert doctor_report.tool("runsc").available == _independent_runsc_echo(tmp_path, runsc)
    assert doctor_report.backend("gvisor").available == doctor_report.tool("runsc").available


def test_cgroup_mode_matches_mounts(doctor_report: DoctorReport) -> None:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    fstypes = {line.split()[2] for line in mounts}
    has_v1, has_v2 = "cgroup" in fstypes, "cgroup2" in fstypes
    expected = {
        (True, True): CgroupMode.HYBRID,
        (True, False): CgroupMode.V1,
        (False, True): CgroupMode.V2,
        (False, False): CgroupMode.NONE,
    }[(has_v1, has_v2)]
    assert doctor_report.kernel.cgroups.mode is expected


def test_wasmtime_verdict(doctor_report: DoctorReport) -> None:
    assert doctor_report.tool("wasmtime").available
    assert wasmtime.Engine() is not None


def test_resources_are_plausible(doctor_report: DoctorReport) -> None:
    k = doctor_report.kernel
    assert k.cpus == os.cpu_count()
    assert 0 < k.memory.available_bytes <= k.memory.total_bytes
    assert 0 < k.disk.free_bytes <= k.disk.total_bytes


def test_cli_json_is_the_same_report_shape() -> None:
    proc = subprocess.run(
        [TARTARUS, "doctor", "--json"], capture_output=True, text=True, check=True, timeout=120
    )
    data = json.loads(proc.stdout)
    assert {b["name"] for b in data["backends"]} == {"microvm", "gvisor", "jail", "wasm"}
    assert data["kernel"]["kvm"]["flavour"] in {f.value for f in KvmFlavour}
    assert data["best_backend"] in {None, "microvm", "gvisor", "jail"}


def test_cli_table_names_every_backend() -> None:
    proc = subprocess.run(
        [TARTARUS, "doctor"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    for name in (
        "microvm",
        "gvisor",
        "jail",
        "wasm",
        "KVM flavour",
        "best backend",
        "egress-filter",
    ):
        assert name in proc.stdout


def test_the_egress_filter_verdict_says_which_enforcer(doctor_report: DoctorReport) -> None:
    """As root on a kernel with BPF the eBPF filter loads (the issue's measured host);
    the doctor's verdict agrees with loading it here, and names the fallback otherwise."""
    check = doctor_report.tool("egress-filter")
    reason = EbpfEnforcer.probe()
    if reason is None:
        assert check.available and "eBPF" in check.detail
    else:
        assert "nftables fallback" in check.detail and reason in check.detail


def test_asking_for_nftables_is_reported_as_such() -> None:
    check = check_egress_filter(NetworkSettings(enforcer=EnforcerChoice.NFTABLES))
    assert check.available and check.detail == "nftables, as [network] enforcer says"
