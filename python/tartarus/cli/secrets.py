"""`tartarus secrets`: the encrypted local secret store on this host (`local:` refs)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from tartarus.auth.principal import DEFAULT_TENANT
from tartarus.cli.auth import json_option
from tartarus.cli.output import console, emit_json, err_console
from tartarus.config import load_settings
from tartarus.secrets.local_store import Keyring, LocalSecretStore
from tartarus.secrets.providers import SecretError

tenant_option = click.option(
    "--tenant", default=DEFAULT_TENANT, show_default=True, help="Whose secret."
)


def _paths() -> tuple[Path, Path]:
    settings = load_settings()
    return (
        settings.state_dir / "secrets.db",
        settings.secrets.key_file or settings.state_dir / "secrets.key",
    )


def _store() -> LocalSecretStore:
    db, key_file = _paths()
    return LocalSecretStore(db, key_file)


@click.group("secrets")
def secrets_group() -> None:
    """Secrets for sandboxes: `local:NAME` references, encrypted on this host."""


@secrets_group.command("init")
def init_command() -> None:
    """Create the key file (the key-encryption key) of the local store."""
    _db, key_file = _paths()
    try:
        ring = Keyring.create(key_file)
    except SecretError as e:
        raise click.ClickException(str(e)) from e
    err_console.print(f"created {key_file} with key {ring.primary}; back it up", highlight=False)


@secrets_group.command("set")
@tenant_option
@click.argument("name")
def set_command(*, name: str, tenant: str) -> None:
    """Store a secret; its value is read from stdin (never from the command line)."""
    if sys.stdin.isatty():
        value = click.prompt(f"value of {name}", hide_input=True, confirmation_prompt=True)
    else:
        value = sys.stdin.read().removesuffix("\n")
    if not value:
        raise click.ClickException("refusing to store an empty secret")
    store = _store()
    try:
        store.put(tenant, name, value)
    except SecretError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()
    err_console.print(f"stored local:{name} for tenant {tenant}", highlight=False)


@secrets_group.command("list")
@click.option("--tenant", help="Only this tenant's secrets.")
@json_option
def list_command(*, tenant: str | None, as_json: bool) -> None:
    """List secrets (names only)."""
    store = _store()
    try:
        entries = store.list(tenant)
    finally:
        store.close()
    if as_json:
        emit_json(entries)
        return
    table = Table(box=None, header_style="bold")
    for column in ("TENANT", "NAME", "KEY"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.tenant, f"local:{e.name}", e.kek_id)
    console.print(table)


@secrets_group.command("rm")
@tenant_option
@click.argument("name")
def rm_command(*, name: str, tenant: str) -> None:
    """Remove a secret."""
    store = _store()
    try:
        removed = store.remove(tenant, name)
    finally:
        store.close()
    if not removed:
        raise click.ClickException(f"tenant {tenant} has no secret {name!r}")
    err_console.print(f"removed local:{name} of tenant {tenant}", highlight=False)


@secrets_group.command("rotate-key")
def rotate_key_command() -> None:
    """Add a new key-encryption key and re-wrap every secret's data key with it."""
    store = _store()
    try:
        new_id, count = store.rotate_kek()
    except SecretError as e:
        raise click.ClickException(str(e)) from e
    finally:
        store.close()
    err_console.print(f"new primary key {new_id}; re-wrapped {count} secret(s)", highlight=False)
