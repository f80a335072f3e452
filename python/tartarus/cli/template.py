"""`tartarus template build|list|inspect|rm|gc`: templates and their root filesystems."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import anyio
import click

from tartarus.cli.output import console, emit_json, human_bytes
from tartarus.cli.remote import EXIT_NOT_FOUND, fail
from tartarus.images.errors import TemplateNotFoundError
from tartarus.images.store import TemplateInfo, TemplateStore

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
P = ParamSpec("P")
T = TypeVar("T")


def not_found_exits_3(fn: Callable[P, T]) -> Callable[P, T]:
    """An unknown template exits with EXIT_NOT_FOUND, like an unknown sandbox."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except TemplateNotFoundError as e:
            fail(e, code=EXIT_NOT_FOUND)

    return wrapper


@click.group()
def template() -> None:
    """Build, list, inspect and remove sandbox templates."""


@template.command()
@click.argument("name_or_file")
@click.option("--pull", is_flag=True, help="Look image tags up again instead of the pinned digest.")
@click.option("--no-ext4", is_flag=True, help="Skip the microVM's ext4 image.")
@json_option
@not_found_exits_3
def build(name_or_file: str, pull: bool, no_ext4: bool, as_json: bool) -> None:
    """Build a template by name, or register and build a template FILE (.yaml/.toml)."""
    store = TemplateStore()
    path = Path(name_or_file)
    target: str | Path = path if path.suffix in (".yaml", ".yml", ".toml") else name_or_file

    from tartarus.cli.progress import progress_bars  # noqa: PLC0415 (rich.progress)

    async def run() -> None:
        with progress_bars(not as_json) as progress:
            resolved = await store.build(target, ext4=not no_ext4, pull=pull, progress=progress)
        if as_json:
            emit_json(resolved)
            return
        m = resolved.manifest
        console.print(
            f"[green]built[/green] {m.id}: {human_bytes(m.size_bytes)}, {m.files} files, "
            f"{m.build_seconds:.1f} s"
        )
        console.print(f"  rootfs {resolved.rootfs}")
        if resolved.ext4:
            console.print(f"  ext4   {resolved.ext4}")

    anyio.run(run)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@template.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List templates: built-in and registered, built or not."""
    infos = anyio.run(TemplateStore().list)
    if as_json:
        emit_json(infos)
        return
    from rich.table import Table  # noqa: PLC0415 (people only; --json skips rich)

    table = Table(title="templates")
    for column in ("id", "built", "size", "base", "description"):
        table.add_column(column)
    for info in infos:
        m = info.manifest
        table.add_row(
            info.id + ("" if info.builtin else " [dim](file)[/dim]"),
            _when(m.built_at) if m else "[dim]no[/dim]",
            human_bytes(m.size_bytes) if m else "",
            m.base if m else "",
            info.description,
        )
    console.print(table)


def _render(info: TemplateInfo) -> None:
    from rich.table import Table  # noqa: PLC0415 (people only; --json skips rich)

    table = Table(title=f"template {info.id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("description", info.description)
    table.add_row("source", info.source + (" (built in)" if info.builtin else ""))
    m = info.manifest
    if m is None:
        table.add_row("built", f"no (tartarus template build {info.id})")
    else:
        r = m.resources
        table.add_row("built", f"{_when(m.built_at)} in {m.build_seconds:.1f} s")
        table.add_row("base", m.base)
        table.add_row("rootfs", f"{m.rootfs} ({human_bytes(m.size_bytes)}, {m.files} files)")
        table.add_row("ext4", m.ext4 or "not made")
        table.add_row("layers", "\n".join(m.layers) or "-")
        table.add_row("agent", m.agent)
        table.add_row("env", "\n".join(f"{k}={v}" for k, v in m.env.items()) or "-")
        table.add_row("workdir", m.workdir)
        table.add_row(
            "resources", f"{r.vcpus} vCPU, {r.memory_mib} MiB, {r.disk_mib} MiB disk, {r.pids} pids"
        )
        table.add_row("timeout", f"{m.timeout_s:g} s")
        table.add_row("backends", ", ".join(b.value for b in m.backends) or "any")
        table.add_row("warm-up", m.warmup or "-")
    console.print(table)


@template.command()
@click.argument("name")
@json_option
@not_found_exits_3
def inspect(name: str, as_json: bool) -> None:
    """Show a template's definition and build."""
    store = TemplateStore()
    info = anyio.run(store.inspect, name)
    if as_json:
        emit_json({"info": info, "definition": store.definition(name)})
        return
    _render(info)


@template.command()
@click.argument("name")
@json_option
@not_found_exits_3
def rm(name: str, as_json: bool) -> None:
    """Remove a template's build (and registration) and free blobs nothing else uses."""
    report = anyio.run(TemplateStore().remove, name)
    if as_json:
        emit_json(report)
        return
    what = "removed" if report.unregistered else "removed the build of"
    console.print(
        f"{what} {report.id}: {len(report.gc.removed)} blobs deleted, "
        f"{human_bytes(report.gc.freed_bytes)} freed"
    )


@template.command()
@json_option
def gc(as_json: bool) -> None:
    """Delete blobs no template, snapshot or sandbox references."""
    report = anyio.run(TemplateStore().gc)
    if as_json:
        emit_json(report)
        return
    console.print(f"{len(report.removed)} blobs deleted, {human_bytes(report.freed_bytes)} freed")
