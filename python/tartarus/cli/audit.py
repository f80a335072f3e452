"""`tartarus audit`: read the audit log through the server; verify its hash chain
directly on the log file (no server needed, and no need to trust one)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click
from rich.table import Table

from tartarus.api.security import AuditPage
from tartarus.cli.auth import json_option
from tartarus.cli.output import console, emit_json, err_console
from tartarus.cli.remote import connect, run_async, url_option
from tartarus.config import load_settings
from tartarus.policy.audit_log import AuditError, AuditLog

EXIT_TAMPERED = 2

db_option = click.option(
    "--db",
    "db",
    type=click.Path(path_type=Path),
    help="The audit log file [default: STATE_DIR/audit.db].",
)


def _open(db: Path | None) -> AuditLog:
    path = db or load_settings().state_dir / "audit.db"
    try:
        return AuditLog(path, read_only=True)
    except AuditError as e:
        raise click.ClickException(str(e)) from e


@click.group("audit")
def audit_group() -> None:
    """The audit log (Aeacus): who did what, every admission verdict, hash-chained."""


@audit_group.command("verify")
@db_option
@click.option("--expect-head", help="A head hash recorded earlier that must be in the chain.")
@json_option
def verify_command(*, db: Path | None, expect_head: str | None, as_json: bool) -> None:
    """Check every entry's hash and link. Exits 0 if intact, 2 if tampered with."""
    log = _open(db)
    try:
        result = log.verify(expect_head=expect_head)
    finally:
        log.close()
    if as_json:
        emit_json(result)
    elif result.ok:
        err_console.print(
            f"[green]intact[/green]: {result.entries} entries"
            + (f" ({result.first_seq}..{result.last_seq})" if result.entries else "")
            + f", head {result.head}",
            highlight=False,
        )
    else:
        err_console.print(f"[red]TAMPERED[/red]: {len(result.problems)} problem(s)")
        for problem in result.problems:
            err_console.print(f"  {problem}", highlight=False)
    sys.exit(0 if result.ok else EXIT_TAMPERED)


@audit_group.command("head")
@db_option
def head_command(*, db: Path | None) -> None:
    """Print the last entry's number and hash: record it elsewhere, then
    `verify --expect-head` proves nothing up to it was rewritten."""
    log = _open(db)
    try:
        seq, digest = log.head()
    finally:
        log.close()
    click.echo(f"{seq} {digest}")


@audit_group.command("list")
@click.option("--tenant", help="Only this tenant's entries (operators).")
@click.option("--after", type=int, default=0, help="Entries after this sequence number.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@json_option
@url_option
def list_command(
    *, tenant: str | None, after: int, limit: int, as_json: bool, url: str | None
) -> None:
    """Read audit entries through the server."""
    page = _list(tenant, after, limit, url)
    if as_json:
        emit_json(page)
        return
    table = Table(box=None, header_style="bold")
    for column in ("SEQ", "TIME", "TENANT", "WHO", "ACTION", "OUTCOME", "DETAIL"):
        table.add_column(column)
    for e in page.items:
        reasons = "; ".join(f"{v['judge']}: {v['reason']}" for v in e.verdicts if not v["allowed"])
        table.add_row(
            str(e.seq),
            dt.datetime.fromtimestamp(e.ts).strftime("%Y-%m-%d %H:%M:%S"),
            e.tenant or "-",
            e.subject or "-",
            e.action,
            e.outcome,
            reasons or e.detail,
        )
    console.print(table)


@run_async
async def _list(tenant: str | None, after: int, limit: int, url: str | None) -> AuditPage:
    async with await connect(url) as client:
        return await client.call(
            "GET", "/v1/audit", AuditPage, params={"tenant": tenant, "after": after, "limit": limit}
        )
