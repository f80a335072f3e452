"""Entry point of the `tartarus` command: a click group that gathers the subcommands."""

from __future__ import annotations

import sys

import click

from tartarus import __version__
from tartarus.cli.doctor import doctor
from tartarus.cli.output import err_console
from tartarus.cli.run import run
from tartarus.errors import TartarusError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tartarus")
def cli() -> None:
    """Tartarus: run untrusted code in sandboxes that start in milliseconds."""


cli.add_command(doctor)
cli.add_command(run)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except TartarusError as e:
        err_console.print(f"[red]error:[/red] {e}")
        sys.exit(1)
