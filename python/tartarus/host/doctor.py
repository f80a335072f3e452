"""The doctor: combines kernel facts and tool checks into a verdict per backend."""

from __future__ import annotations

import os
import platform

import msgspec

from tartarus import __version__
from tartarus.binaries import find_binary
from tartarus.config import Settings
from tartarus.errors import BinaryNotFoundError
from tartarus.host.kernel import CgroupMode, KernelReport, probe_kernel
from tartarus.host.tools import ToolCheck, check_runsc, check_wasmtime
from tartarus.network.ebpf import EbpfEnforcer
from tartarus.network.settings import EnforcerChoice, NetworkSettings

# Strongest isolation first: the order `auto` walks for a Linux workload.
LINUX_BACKENDS = ("microvm", "gvisor", "jail")


class BackendVerdict(msgspec.Struct, frozen=True):
    name: str
    available: bool
    reason: str


class DoctorReport(msgspec.Struct, frozen=True, kw_only=True):
    tartarus_version: str
    python: str
    kernel: KernelReport
    tools: list[ToolCheck]
    backends: list[BackendVerdict]
    best_backend: str | None

    def backend(self, name: str) -> BackendVerdict:
        return next(b for b in self.backends if b.name == name)

    def tool(self, name: str) -> ToolCheck:
        return next(t for t in self.tools if t.name == name)


def _binary_present(name: str) -> str | None:
    try:
        find_binary(name)
    except BinaryNotFoundError as e:
        return str(e)
    return None


def judge_backends(kernel: KernelReport, tools: list[ToolCheck]) -> list[BackendVerdict]:
    """Decides which backends this host can run, with a reason a human can act on."""
    by_name = {t.name: t for t in tools}
    vmm_missing = _binary_present("tartarus-vmm")
    if not kernel.kvm.full_guests:
        microvm = BackendVerdict(
            "microvm", False, f"KVM cannot run a full guest: {kernel.kvm.detail}"
        )
    elif vmm_missing:
        microvm = BackendVerdict("microvm", False, vmm_missing)
    else:
        microvm = BackendVerdict("microvm", True, "hardware KVM delivers guest exceptions")
    runsc = by_name["runsc"]
    gvisor = BackendVerdict("gvisor", runsc.available, runsc.detail)
    privileged = os.geteuid() == 0 or kernel.user_namespaces.available
    if not kernel.seccomp.available:
        jail = BackendVerdict("jail", False, kernel.seccomp.detail)
    elif not privileged:
        jail = BackendVerdict("jail", False, kernel.user_namespaces.detail)
    else:
        limits = (
            "with cgroup limits"
            if kernel.cgroups.mode is not CgroupMode.NONE
            else "without cgroup limits (no cgroup filesystem)"
        )
        jail = BackendVerdict("jail", True, f"namespaces and seccomp available, {limits}")
    wasm_tool = by_name["wasmtime"]
    wasm = BackendVerdict("wasm", wasm_tool.available, wasm_tool.detail)
    return [microvm, gvisor, jail, wasm]


def check_egress_filter(network: NetworkSettings) -> ToolCheck:
    """Which enforcer applies sandboxes' egress rules here (`[network] enforcer`)."""
    name = "egress-filter"
    nft = _binary_present("nft") is None
    if network.enforcer is EnforcerChoice.NFTABLES:
        detail = "nftables, as [network] enforcer says" if nft else "nftables: nft is missing"
        return ToolCheck(name=name, available=nft, detail=detail)
    reason = EbpfEnforcer.probe()
    if reason is None:
        # nftables still carries the NAT and the inbound guard.
        detail = "eBPF tc classifier on each link" + ("" if nft else "; but nft is missing")
        return ToolCheck(name=name, available=nft, detail=detail)
    if network.enforcer is EnforcerChoice.EBPF:
        return ToolCheck(name=name, available=False, detail=f"eBPF was asked for, but {reason}")
    return ToolCheck(
        name=name,
        available=nft,
        detail=f"nftables fallback (the eBPF filter does not load: {reason})",
    )


def run_doctor(settings: Settings) -> DoctorReport:
    kernel = probe_kernel(settings.cache_dir)
    tools = [
        check_runsc(settings.runsc, settings.cache_dir),
        check_wasmtime(),
        check_egress_filter(settings.network),
    ]
    backends = judge_backends(kernel, tools)
    best = next(
        (b.name for b in backends if b.name in LINUX_BACKENDS and b.available),
        None,
    )
    return DoctorReport(
        tartarus_version=__version__,
        python=platform.python_version(),
        kernel=kernel,
        tools=tools,
        backends=backends,
        best_backend=best,
    )
