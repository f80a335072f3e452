"""`tartarus init ...`: starting points for files Tartarus reads."""

from __future__ import annotations

from pathlib import Path

import click

from tartarus.cli.output import console
from tartarus.images.scaffold import ORIGINS_HELP, origin_template, render


@click.group()
def init() -> None:
    """Create starting files (templates)."""


@init.command("template")
@click.argument("name")
@click.option("--from", "origin", default="base", show_default=True, help=ORIGINS_HELP)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write it (default: ./NAME.yaml).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init_template(name: str, origin: str, output: Path | None, force: bool) -> None:
    """Write a commented template file NAME.yaml to edit and build."""
    path = output or Path(f"{name}.yaml")
    text = render(origin_template(name, origin, path.resolve().parent), origin)
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; pass --force to overwrite it")
    path.write_text(text)
    console.print(f"wrote {path}; build it with: tartarus template build {path}")
