"""`tartarus doctor`: what this host can run, decided by real probes."""

from __future__ import annotations

import click
from rich.table import Table

from tartarus.cli.output import console, emit_json, human_bytes
from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport, run_doctor


def _mark(ok: bool) -> str:
    return "[green]yes[/green]" if ok else "[red]no[/red]"


def render(report: DoctorReport) -> None:
    k = report.kernel
    facts = Table(title=f"tartarus {report.tartarus_version} doctor", show_lines=False)
    facts.add_column("check")
    facts.add_column("ok")
    facts.add_column("detail", overflow="fold")
    kvm = k.kvm
    facts.add_row("KVM device", _mark(kvm.device_present), "/dev/kvm")
    facts.add_row(
        "KVM openable",
        _mark(kvm.openable),
        f"API version {kvm.api_version}" if kvm.api_version else kvm.detail,
    )
    speed = (
        f"; guest loop {kvm.loop_ns_per_iteration:.1f} ns/iteration"
        if kvm.loop_ns_per_iteration is not None
        else ""
    )
    facts.add_row("KVM flavour", kvm.flavour.value, f"probe run: {kvm.exit}{speed}")
    facts.add_row("full guests (Linux)", _mark(kvm.full_guests), kvm.detail)
    for tool in report.tools:
        extra = f" ({tool.seconds * 1000:.1f} ms)" if tool.seconds is not None else ""
        facts.add_row(
            tool.name, _mark(tool.available), f"{tool.version or ''} {tool.detail}{extra}"
        )
    cg = k.cgroups
    facts.add_row(
        "cgroups",
        _mark(cg.mode.value != "none"),
        f"{cg.mode.value}; v2 at {cg.v2_mount}; v1: {', '.join(cg.v1_controllers) or '-'}",
    )
    facts.add_row("seccomp", _mark(k.seccomp.available), k.seccomp.detail)
    facts.add_row("user namespaces", _mark(k.user_namespaces.available), k.user_namespaces.detail)
    facts.add_row("/dev/net/tun", _mark(k.tun.available), k.tun.detail)
    facts.add_row(
        "memory",
        "",
        f"{human_bytes(k.memory.available_bytes)} available of {human_bytes(k.memory.total_bytes)}",
    )
    facts.add_row(
        "disk",
        "",
        f"{human_bytes(k.disk.free_bytes)} free of {human_bytes(k.disk.total_bytes)}"
        f" at {k.disk.path}",
    )
    facts.add_row(
        "host", "", f"{k.kernel} {k.arch}, {k.cpus} CPUs, flags: {' '.join(k.cpu_virt_flags)}"
    )
    console.print(facts)

    backends = Table(title="backends")
    backends.add_column("backend")
    backends.add_column("usable")
    backends.add_column("why", overflow="fold")
    for b in report.backends:
        backends.add_row(b.name, _mark(b.available), b.reason)
    console.print(backends)
    console.print(f"best backend for Linux workloads: [bold]{report.best_backend or 'none'}[/bold]")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Probe this host: KVM flavour, runsc, wasmtime, cgroups, namespaces, resources."""
    report = run_doctor(load_settings())
    if as_json:
        emit_json(report)
    else:
        render(report)
