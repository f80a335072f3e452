"""`tartarus auth`: who am I, and API keys (create, list, revoke, rotate)."""

from __future__ import annotations

import datetime as dt
import re

import click
from rich.table import Table

from tartarus.api.security import (
    CreateKeyRequest,
    KeyCreated,
    KeyInfo,
    KeyList,
    RotateKeyRequest,
    WhoAmI,
)
from tartarus.cli.output import console, emit_json, err_console
from tartarus.cli.remote import connect, run_async, url_option

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` → seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise click.BadParameter(f"{text!r}: expected a number with s, m, h, d or w")
    return float(match.group(1)) * _UNITS[match.group(2)]


def when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M")


@click.group("auth")
def auth_group() -> None:
    """Authentication: the caller's identity and API keys."""


@auth_group.command("whoami")
@json_option
@url_option
def whoami_command(*, as_json: bool, url: str | None) -> None:
    """Who the server thinks you are: tenant, roles, permissions."""
    me = _whoami(url)
    if as_json:
        emit_json(me)
        return
    console.print(f"[bold]{me.subject}[/bold] ({me.method})", highlight=False)
    console.print(f"tenant:      {me.tenant}", highlight=False)
    console.print(f"roles:       {', '.join(me.roles) or '-'}", highlight=False)
    console.print(f"permissions: {', '.join(me.permissions) or '-'}", highlight=False)


@run_async
async def _whoami(url: str | None) -> WhoAmI:
    async with await connect(url) as client:
        return await client.call("GET", "/v1/auth/whoami", WhoAmI)


@auth_group.group("keys")
def keys_group() -> None:
    """API keys: `tsk_<id>_<secret>`, scoped to a tenant and roles."""


@keys_group.command("create")
@click.option("--name", required=True, help="What the key is for (shown in listings).")
@click.option(
    "--role", "roles", multiple=True, required=True, help="A role to grant (repeat for several)."
)
@click.option("--tenant", help="The key's tenant [default: yours; others need admin:tenants].")
@click.option("--expires", help="Lifetime, e.g. 30d, 12h [default: until revoked].")
@json_option
@url_option
def create_command(
    *,
    name: str,
    roles: tuple[str, ...],
    tenant: str | None,
    expires: str | None,
    as_json: bool,
    url: str | None,
) -> None:
    """Create an API key. The key is printed once: store it now."""
    body = CreateKeyRequest(
        name=name,
        roles=list(roles),
        tenant=tenant,
        expires_in_s=None if expires is None else parse_duration(expires),
    )
    created = _create(body, url)
    if as_json:
        emit_json(created)
        return
    err_console.print(
        f"created key [bold]{created.key.prefix}[/bold] for tenant {created.key.tenant} "
        f"(roles: {', '.join(created.key.roles)}, expires: {when(created.key.expires_at)}); "
        "it is shown only now:",
        highlight=False,
    )
    click.echo(created.token)


@run_async
async def _create(body: CreateKeyRequest, url: str | None) -> KeyCreated:
    async with await connect(url) as client:
        return await client.call("POST", "/v1/auth/keys", KeyCreated, json=body)


@keys_group.command("list")
@click.option("--tenant", help="Only this tenant's keys (operators).")
@json_option
@url_option
def list_command(*, tenant: str | None, as_json: bool, url: str | None) -> None:
    """List API keys (never their secrets)."""
    keys = _list(tenant, url)
    if as_json:
        emit_json(keys.items)
        return
    table = Table(box=None, header_style="bold")
    for column in ("KEY", "NAME", "TENANT", "ROLES", "CREATED", "EXPIRES", "LAST USED", "STATE"):
        table.add_column(column)
    for k in keys.items:
        state = "active" if k.active else ("revoked" if k.revoked_at else "expired")
        table.add_row(
            k.prefix,
            k.name,
            k.tenant,
            ",".join(k.roles),
            when(k.created_at),
            when(k.expires_at),
            when(k.last_used_at),
            state,
        )
    console.print(table)


@run_async
async def _list(tenant: str | None, url: str | None) -> KeyList:
    async with await connect(url) as client:
        return await client.call("GET", "/v1/auth/keys", KeyList, params={"tenant": tenant})


def key_id(text: str) -> str:
    """Accepts the id, the visible prefix (`tsk_<id>`) or a whole key."""
    return text.removeprefix("tsk_").split("_", 1)[0]


@keys_group.command("revoke")
@json_option
@url_option
@click.argument("key")
def revoke_command(*, key: str, as_json: bool, url: str | None) -> None:
    """Revoke a key (by id or `tsk_<id>` prefix); it stops working at once."""
    info = _revoke(key_id(key), url)
    if as_json:
        emit_json(info)
        return
    err_console.print(f"revoked {info.prefix} ({info.name})", highlight=False)


@run_async
async def _revoke(kid: str, url: str | None) -> KeyInfo:
    async with await connect(url) as client:
        return await client.call("DELETE", f"/v1/auth/keys/{kid}", KeyInfo)


@keys_group.command("rotate")
@click.option(
    "--grace", default="1h", show_default=True, help="How long the old key keeps working."
)
@json_option
@url_option
@click.argument("key")
def rotate_command(*, key: str, grace: str, as_json: bool, url: str | None) -> None:
    """Replace a key with a new one (same tenant, name, roles); prints the new key."""
    created = _rotate(key_id(key), RotateKeyRequest(grace_s=parse_duration(grace)), url)
    if as_json:
        emit_json(created)
        return
    err_console.print(
        f"new key {created.key.prefix}; the old one works for {grace} more:", highlight=False
    )
    click.echo(created.token)


@run_async
async def _rotate(kid: str, body: RotateKeyRequest, url: str | None) -> KeyCreated:
    async with await connect(url) as client:
        return await client.call("POST", f"/v1/auth/keys/{kid}/rotate", KeyCreated, json=body)
