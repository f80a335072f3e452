"""`tartarus snapshot create|list|inspect|restore|rm|prune` and `tartarus pool ls|set`
(Nyx), through the server."""

from __future__ import annotations

import functools
import re

import click
from rich.table import Table

from tartarus.api.snapshots import PoolInfo, PruneReport, SnapshotEntry
from tartarus.api.types import DEFAULT_TIMEOUT_S, SandboxInfo
from tartarus.cli.output import console, emit_json, err_console, human_bytes, relative_time
from tartarus.cli.remote import connect, parse_pairs, run_async, url_option
from tartarus.runtime.types import Backend
from tartarus.sdk.sandbox import Sandbox
from tartarus.sdk.snapshots import Snapshots
from tartarus.snapshots.catalog import SnapshotPurpose

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d`, `2w` -> seconds."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise click.BadParameter(f"{text!r}: use a number with s, m, h, d or w (e.g. 7d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _table(entries: list[SnapshotEntry]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("ID", "TEMPLATE", "BACKEND", "PURPOSE", "FROM", "SIZE", "CREATED", "LABEL"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            e.id,
            e.template,
            e.backend.value,
            e.purpose.value + (" (diff)" if e.parent else ""),
            e.source_sandbox or "-",
            human_bytes(e.size_bytes),
            relative_time(e.created_at),
            e.label,
        )
    return table


@click.group("snapshot")
def snapshot() -> None:
    """Snapshots: save running sandboxes, restore and copy them, warm templates."""


@snapshot.command("create")
@click.option("-t", "--template", help="Build this template's warm snapshot instead.")
@click.option(
    "-b",
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default="auto",
    show_default=True,
    help="Backend for a template snapshot.",
)
@click.option("-l", "--label", default="", help="A note to remember it by.")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Labels to attach.")
@json_option
@url_option
@click.argument("sandbox_id", required=False)
def create_command(
    *,
    template: str | None,
    backend: str,
    label: str,
    metadata: tuple[str, ...],
    as_json: bool,
    url: str | None,
    sandbox_id: str | None,
) -> None:
    """Snapshot the running sandbox SANDBOX_ID (it keeps running), or with --template
    start the template, run its warm-up script and snapshot it."""
    if (sandbox_id is None) == (template is None):
        raise click.UsageError("give a SANDBOX_ID or --template, not both")
    create = functools.partial(
        _create,
        sandbox_id=sandbox_id,
        template=template,
        backend=Backend(backend),
        label=label,
        metadata=parse_pairs(metadata, "--metadata"),
        url=url,
    )
    if as_json:
        emit_json(create())
        return
    what = f"sandbox {sandbox_id}" if sandbox_id else f"template {template} (start, warm up)"
    with err_console.status(f"snapshotting {what}..."):
        entry = create()
    console.print(_table([entry]))


@run_async
async def _create(
    *,
    sandbox_id: str | None,
    template: str | None,
    backend: Backend,
    label: str,
    metadata: dict[str, str],
    url: str | None,
) -> SnapshotEntry:
    async with await connect(url) as client:
        if sandbox_id is not None:
            sb = await Sandbox.connect(sandbox_id, client=client)
            return await sb.snapshot(label=label, metadata=metadata)
        assert template is not None
        return await Snapshots(client, owns_client=False).create(
            template, backend=backend, label=label
        )


@snapshot.command("list")
@click.option("-t", "--template", help="Only this template's snapshots.")
@click.option(
    "-p",
    "--purpose",
    "purposes",
    multiple=True,
    type=click.Choice([p.value for p in SnapshotPurpose]),
    help="Only these purposes (repeat for several).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only ids.")
@json_option
@url_option
def list_command(
    *, template: str | None, purposes: tuple[str, ...], quiet: bool, as_json: bool, url: str | None
) -> None:
    """List snapshots, oldest first."""
    entries = _list(template, [SnapshotPurpose(p) for p in purposes], url)
    if as_json:
        emit_json(entries)
    elif quiet:
        for e in entries:
            click.echo(e.id)
    else:
        console.print(_table(entries))


@run_async
async def _list(
    template: str | None, purposes: list[SnapshotPurpose], url: str | None
) -> list[SnapshotEntry]:
    async with Snapshots(await connect(url)) as snaps:
        return await snaps.list(template=template, purposes=purposes or None)


@snapshot.command("inspect")
@url_option
@click.argument("snapshot_id")
def inspect_command(*, url: str | None, snapshot_id: str) -> None:
    """Print everything the server knows about a snapshot, as JSON."""
    emit_json(_get(snapshot_id, url))


@run_async
async def _get(snapshot_id: str, url: str | None) -> SnapshotEntry:
    async with Snapshots(await connect(url)) as snaps:
        return await snaps.get(snapshot_id)


@snapshot.command("restore")
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds before the sandbox is stopped.",
)
@click.option("-n", "--count", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Labels to attach.")
@json_option
@url_option
@click.argument("snapshot_id")
def restore_command(
    *,
    timeout: float,
    count: int,
    metadata: tuple[str, ...],
    as_json: bool,
    url: str | None,
    snapshot_id: str,
) -> None:
    """Start COUNT sandboxes from a snapshot; prints their ids."""
    pairs = parse_pairs(metadata, "--metadata")
    if as_json:
        emit_json(_restore(snapshot_id, count, timeout, pairs, url))
        return
    with err_console.status(f"restoring {snapshot_id}..."):
        infos = _restore(snapshot_id, count, timeout, pairs, url)
    for info in infos:
        click.echo(info.id)


@run_async
async def _restore(
    snapshot_id: str, count: int, timeout_s: float, metadata: dict[str, str], url: str | None
) -> list[SandboxInfo]:
    async with Snapshots(await connect(url)) as snaps:
        infos = []
        for _ in range(count):
            sb = await snaps.restore(snapshot_id, timeout=timeout_s, metadata=metadata)
            infos.append(sb.info)
            await sb.close()
        return infos


@snapshot.command("rm")
@json_option
@url_option
@click.argument("snapshot_ids", nargs=-1, required=True)
def rm_command(*, as_json: bool, url: str | None, snapshot_ids: tuple[str, ...]) -> None:
    """Delete snapshots (their files go once no restored sandbox holds them)."""
    removed = _rm(list(snapshot_ids), url)
    if as_json:
        emit_json({"removed": removed})
    else:
        for snapshot_id in removed:
            click.echo(snapshot_id)


@run_async
async def _rm(snapshot_ids: list[str], url: str | None) -> list[str]:
    async with Snapshots(await connect(url)) as snaps:
        for snapshot_id in snapshot_ids:
            await snaps.delete(snapshot_id)
    return snapshot_ids


@snapshot.command("prune")
@click.option("--older-than", help="Only snapshots older than this (90s, 15m, 12h, 7d, 2w).")
@click.option("--keep", type=click.IntRange(0), help="Keep the newest N per template.")
@click.option("-t", "--template", help="Only this template's snapshots.")
@click.option(
    "-p",
    "--purpose",
    "purposes",
    multiple=True,
    type=click.Choice([p.value for p in SnapshotPurpose]),
    help="Only these purposes [default: user and terminate].",
)
@click.option("--dry-run", is_flag=True, help="Show what would go; delete nothing.")
@json_option
@url_option
def prune_command(
    *,
    older_than: str | None,
    keep: int | None,
    template: str | None,
    purposes: tuple[str, ...],
    dry_run: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Delete old snapshots: those matching every condition given."""
    if older_than is None and keep is None:
        raise click.UsageError("give --older-than and/or --keep")
    age = parse_duration(older_than) if older_than is not None else None
    report = _prune(
        older_than=age,
        keep=keep,
        template=template,
        purposes=[SnapshotPurpose(p) for p in purposes],
        dry_run=dry_run,
        url=url,
    )
    if as_json:
        emit_json(report)
        return
    for snapshot_id in report.removed:
        click.echo(snapshot_id)
    verb = "would delete" if dry_run else "deleted"
    err_console.print(
        f"{verb} {len(report.removed)} snapshot(s), freed {human_bytes(report.freed_bytes)}"
    )


@run_async
async def _prune(
    *,
    older_than: float | None,
    keep: int | None,
    template: str | None,
    purposes: list[SnapshotPurpose],
    dry_run: bool,
    url: str | None,
) -> PruneReport:
    async with Snapshots(await connect(url)) as snaps:
        return await snaps.prune(
            older_than=older_than,
            keep=keep,
            template=template,
            purposes=purposes or None,
            dry_run=dry_run,
        )


@click.group("pool")
def pool() -> None:
    """Warm pools: ready sandboxes per template, so creating one is a hand-over."""


@pool.command("ls")
@json_option
@url_option
def pool_ls_command(*, as_json: bool, url: str | None) -> None:
    """Show every warm pool: its target, how many are ready, hits and misses."""
    pools = _pools(url)
    if as_json:
        emit_json(pools)
        return
    table = Table(box=None, header_style="bold")
    for column in ("TEMPLATE", "TARGET", "READY", "BACKEND", "HITS", "MISSES", "ERROR"):
        table.add_column(column)
    for p in pools:
        table.add_row(
            p.template,
            str(p.target),
            str(p.ready),
            p.backend.value,
            str(p.hits),
            str(p.misses),
            p.last_error,
        )
    console.print(table)


@run_async
async def _pools(url: str | None) -> list[PoolInfo]:
    async with Snapshots(await connect(url)) as snaps:
        return await snaps.pools()


@pool.command("set")
@click.option(
    "-b",
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default="auto",
    show_default=True,
)
@json_option
@url_option
@click.argument("template")
@click.argument("size", type=click.IntRange(0, 64))
def pool_set_command(
    *, backend: str, as_json: bool, url: str | None, template: str, size: int
) -> None:
    """Keep SIZE ready sandboxes of TEMPLATE (0 empties the pool)."""
    info = _set_pool(template, size, Backend(backend), url)
    if as_json:
        emit_json(info)
    else:
        click.echo(f"{info.template}: target {info.target}, {info.ready} ready")


@run_async
async def _set_pool(template: str, size: int, backend: Backend, url: str | None) -> PoolInfo:
    async with Snapshots(await connect(url)) as snaps:
        return await snaps.set_pool(template, size, backend=backend)
