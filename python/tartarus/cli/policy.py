"""`tartarus policy`: Themis's versioned policy documents."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import click
import yaml
from rich.table import Table

from tartarus.api.security import (
    ApplyPolicyRequest,
    EffectivePolicy,
    PolicyDiff,
    PolicyHistory,
    PolicyList,
    PolicyVersion,
    RollbackPolicyRequest,
)
from tartarus.cli.auth import json_option, when
from tartarus.cli.output import console, emit_json, err_console
from tartarus.cli.remote import connect, run_async, url_option
from tartarus.policy.documents import PolicyError, canonical_yaml, parse_document
from tartarus.sdk.errors import NotFoundError


@click.group("policy")
def policy_group() -> None:
    """Policy documents: quotas, network, templates, security, secrets, audit."""


def _read(path: str) -> str:
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as e:
        raise click.FileError(path, str(e)) from e


@policy_group.command("apply")
@click.option(
    "--if-version",
    type=int,
    help="Apply only if the current version is this one (0: only if it is new).",
)
@click.option("--comment", default="", help="Why (kept with the version).")
@json_option
@url_option
@click.argument("file")
def apply_command(
    *, file: str, if_version: int | None, comment: str, as_json: bool, url: str | None
) -> None:
    """Apply a policy document (YAML; `-` reads stdin) as its next version."""
    text = _read(file)
    try:
        name = parse_document(text).name
    except PolicyError as e:
        raise click.ClickException(str(e)) from e
    version = _apply(
        name, ApplyPolicyRequest(document=text, if_version=if_version, comment=comment), url
    )
    if as_json:
        emit_json(version)
        return
    err_console.print(f"policy {version.name} is now at version {version.version}", highlight=False)


@run_async
async def _apply(name: str, body: ApplyPolicyRequest, url: str | None) -> PolicyVersion:
    async with await connect(url) as client:
        return await client.call("PUT", f"/v1/policies/{name}", PolicyVersion, json=body)


@policy_group.command("list")
@json_option
@url_option
def list_command(*, as_json: bool, url: str | None) -> None:
    """List policy documents and their current versions."""
    listing = _list(url)
    if as_json:
        emit_json(listing.items)
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "TENANT", "VERSION", "UPDATED", "BY"):
        table.add_column(column)
    for p in listing.items:
        table.add_row(
            p.name, p.tenant or "(global)", str(p.version), when(p.updated_at), p.updated_by
        )
    console.print(table)


@run_async
async def _list(url: str | None) -> PolicyList:
    async with await connect(url) as client:
        return await client.call("GET", "/v1/policies", PolicyList)


@policy_group.command("show")
@click.option("--version", type=int, help="This version instead of the current one.")
@json_option
@url_option
@click.argument("name")
def show_command(*, name: str, version: int | None, as_json: bool, url: str | None) -> None:
    """Print a policy document as applied."""
    v = _get(name, version, url)
    if as_json:
        emit_json(v)
        return
    click.echo(v.document, nl=not v.document.endswith("\n"))


@run_async
async def _get(name: str, version: int | None, url: str | None) -> PolicyVersion:
    async with await connect(url) as client:
        return await client.call(
            "GET", f"/v1/policies/{name}", PolicyVersion, params={"version": version}
        )


@policy_group.command("history")
@json_option
@url_option
@click.argument("name")
def history_command(*, name: str, as_json: bool, url: str | None) -> None:
    """Every version of a policy document."""
    history = _history(name, url)
    if as_json:
        emit_json(history.versions)
        return
    table = Table(box=None, header_style="bold")
    for column in ("VERSION", "CREATED", "BY", "COMMENT"):
        table.add_column(column)
    for v in history.versions:
        table.add_row(str(v.version), when(v.created_at), v.created_by, v.comment)
    console.print(table)


@run_async
async def _history(name: str, url: str | None) -> PolicyHistory:
    async with await connect(url) as client:
        return await client.call("GET", f"/v1/policies/{name}/history", PolicyHistory)


@policy_group.command("diff")
@click.option("--from", "from_", type=int, help="The older version [default: the one before].")
@click.option("--to", type=int, help="The newer version [default: the current one].")
@url_option
@click.argument("name_or_file")
def diff_command(*, name_or_file: str, from_: int | None, to: int | None, url: str | None) -> None:
    """Compare versions of a policy, or a local file with what is applied.

    `tartarus policy diff global` shows the last change; `tartarus policy diff
    policy.yaml` shows what applying the file would change. Exits 1 when they differ.
    """
    path = Path(name_or_file)
    if name_or_file == "-" or path.is_file():
        text = _read(name_or_file)
        try:
            doc = parse_document(text)
        except PolicyError as e:
            raise click.ClickException(str(e)) from e
        current = _current_or_none(doc.name, url)
        before = (
            ""
            if current is None or not current.document
            else canonical_yaml(parse_document(current.document))
        )
        diff = "".join(
            difflib.unified_diff(
                before.splitlines(keepends=True),
                canonical_yaml(doc).splitlines(keepends=True),
                fromfile=f"{doc.name}@{current.version if current else 0}",
                tofile=name_or_file,
            )
        )
    else:
        diff = _diff(name_or_file, from_, to, url).diff
    click.echo(diff, nl=False)
    sys.exit(1 if diff else 0)


@run_async
async def _current_or_none(name: str, url: str | None) -> PolicyVersion | None:
    async with await connect(url) as client:
        try:
            return await client.call("GET", f"/v1/policies/{name}", PolicyVersion)
        except NotFoundError:
            return None


@run_async
async def _diff(name: str, from_: int | None, to: int | None, url: str | None) -> PolicyDiff:
    async with await connect(url) as client:
        return await client.call(
            "GET", f"/v1/policies/{name}/diff", PolicyDiff, params={"from": from_, "to": to}
        )


@policy_group.command("rollback")
@click.option("--if-version", type=int, help="Only if the current version is this one.")
@json_option
@url_option
@click.argument("name")
@click.argument("version", type=int)
def rollback_command(
    *, name: str, version: int, if_version: int | None, as_json: bool, url: str | None
) -> None:
    """Make VERSION's content current again (as a new version)."""
    v = _rollback(name, RollbackPolicyRequest(version=version, if_version=if_version), url)
    if as_json:
        emit_json(v)
        return
    err_console.print(
        f"policy {v.name} is now at version {v.version} (the content of version {version})",
        highlight=False,
    )


@run_async
async def _rollback(name: str, body: RollbackPolicyRequest, url: str | None) -> PolicyVersion:
    async with await connect(url) as client:
        return await client.call("POST", f"/v1/policies/{name}/rollback", PolicyVersion, json=body)


@policy_group.command("delete")
@click.option("--if-version", type=int, help="Only if the current version is this one.")
@url_option
@click.argument("name")
def delete_command(*, name: str, if_version: int | None, url: str | None) -> None:
    """Stop applying a policy document (its history stays; rollback restores it)."""
    v = _delete(name, if_version, url)
    err_console.print(f"policy {v.name} deleted (version {v.version})", highlight=False)


@run_async
async def _delete(name: str, if_version: int | None, url: str | None) -> PolicyVersion:
    async with await connect(url) as client:
        return await client.call(
            "DELETE", f"/v1/policies/{name}", PolicyVersion, params={"if_version": if_version}
        )


@policy_group.command("effective")
@click.option("--tenant", help="This tenant's (operators) [default: yours].")
@json_option
@url_option
def effective_command(*, tenant: str | None, as_json: bool, url: str | None) -> None:
    """The policy the judges apply to a tenant (global merged with its overrides)."""
    effective = _effective(tenant, url)
    if as_json:
        emit_json(effective)
        return
    click.echo(
        yaml.safe_dump(
            {"tenant": effective.tenant, "versions": effective.versions, "spec": effective.spec},
            sort_keys=True,
        ),
        nl=False,
    )


@run_async
async def _effective(tenant: str | None, url: str | None) -> EffectivePolicy:
    async with await connect(url) as client:
        return await client.call(
            "GET", "/v1/policy/effective", EffectivePolicy, params={"tenant": tenant}
        )
