"""`tartarus kernel build|list|verify`: the microVM guest kernel."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import msgspec
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from tartarus.cli.output import console, emit_json, err_console, human_bytes
from tartarus.config import load_settings
from tartarus.guest import kernel_build, kernel_config
from tartarus.guest.kernel_build import BuildProgress


@click.group()
def kernel() -> None:
    """Build, list and verify the microVM guest kernel."""


class _Bar:
    """Maps build progress events onto one rich task per phase."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, event: BuildProgress) -> None:
        task = self.tasks.get(event.phase)
        if task is None:
            task = self.progress.add_task(event.phase, total=event.total, detail="")
            self.tasks[event.phase] = task
        self.progress.update(
            task, completed=event.done, total=event.total, detail=event.detail[-40:]
        )


@kernel.command("build")
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    default=kernel_build.DEFAULT_SOURCE,
    show_default=True,
    help="Debian linux-source tarball.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel compile jobs (default: CPU count).",
)
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this kernel.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(source: Path, jobs: int | None, force: bool, as_json: bool) -> None:
    """Build the guest kernel (or reuse the cached build of the same inputs)."""
    cache = load_settings().cache_dir
    if as_json or not sys.stderr.isatty():
        manifest = kernel_build.build_kernel(cache, source=source, jobs=jobs, force=force)
    else:
        columns = (
            TextColumn("{task.description:>9}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}"),
        )
        with Progress(*columns, console=err_console) as progress:
            manifest = kernel_build.build_kernel(
                cache, source=source, jobs=jobs, force=force, progress=_Bar(progress)
            )
    if as_json:
        emit_json(manifest)
        return
    path = kernel_build.kernel_dir(cache, manifest.id) / "vmlinux"
    console.print(
        f"kernel [bold]{manifest.id}[/bold] ({manifest.kernel_release}, "
        f"built in {manifest.build_seconds:.0f} s): {path}"
    )


@kernel.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def list_(as_json: bool) -> None:
    """List cached guest kernels, newest first."""
    cache = load_settings().cache_dir
    manifests = kernel_build.list_kernels(cache)
    if as_json:
        emit_json(manifests)
        return
    table = Table(title=f"guest kernels in {kernel_build.kernels_dir(cache)}")
    for column in ("id", "release", "size", "built", "build time"):
        table.add_column(column)
    for m in manifests:
        table.add_row(
            m.id,
            m.kernel_release,
            human_bytes(m.vmlinux_bytes),
            m.built_at,
            f"{m.build_seconds:.0f} s",
        )
    console.print(table)


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    config: str
    checked: int
    ok: bool
    failures: list[kernel_config.Mismatch]


@kernel.command("verify")
@click.argument("kernel_id", required=False)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True),
    help="Check this .config file instead of a cached kernel.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(kernel_id: str | None, config_path: Path | None, as_json: bool) -> None:
    """Check a built kernel's config against the hardening list (exit 1 on a miss)."""
    cache = load_settings().cache_dir
    if config_path is None:
        if kernel_id is None:
            manifests = kernel_build.list_kernels(cache)
            if not manifests:
                raise kernel_build.KernelNotFoundError(
                    "no cached kernel; run `tartarus kernel build` first"
                )
            manifest = manifests[0]
        else:
            manifest = kernel_build.find_kernel(cache, kernel_id)
        config_path = kernel_build.kernel_dir(cache, manifest.id) / "config"
    wanted = kernel_config.load_fragment(kernel_config.HARDENING)
    failures = kernel_build.verify_config(config_path, wanted)
    report = VerifyReport(
        config=str(config_path), checked=len(wanted), ok=not failures, failures=failures
    )
    if as_json:
        emit_json(report)
    else:
        table = Table(title=f"hardening check of {config_path}")
        table.add_column("option")
        table.add_column("want")
        table.add_column("have")
        table.add_column("why", overflow="fold")
        for m in failures:
            table.add_row(m.option.name, m.option.value, f"[red]{m.actual}[/red]", m.option.why)
        if failures:
            console.print(table)
        verdict = "[green]ok[/green]" if report.ok else f"[red]{len(failures)} missing[/red]"
        console.print(f"{report.checked} hardening options checked: {verdict}")
    if failures:
        sys.exit(1)
