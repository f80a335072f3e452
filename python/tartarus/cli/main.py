"""Entry point of the `tartarus` command: a click group that gathers the subcommands."""

from __future__ import annotations

import click

from tartarus import __version__
from tartarus.cli.about import completion_command, version_command
from tartarus.cli.agent import agent_command
from tartarus.cli.audit import audit_group
from tartarus.cli.auth import auth_group
from tartarus.cli.certs import certs_group
from tartarus.cli.doctor import doctor
from tartarus.cli.files import cp_command
from tartarus.cli.init import init
from tartarus.cli.kernel import kernel
from tartarus.cli.policy import policy_group
from tartarus.cli.remote import fail
from tartarus.cli.sandboxes import (
    exec_command,
    inspect_command,
    kill_command,
    logs_command,
    ps_command,
    run_command,
)
from tartarus.cli.secrets import secrets_group
from tartarus.cli.serve import serve_command
from tartarus.cli.snapshots import pool, snapshot
from tartarus.cli.template import template
from tartarus.errors import TartarusError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tartarus")
def cli() -> None:
    """Tartarus: run untrusted code in sandboxes that start in milliseconds."""


for command in (
    run_command,
    exec_command,
    ps_command,
    logs_command,
    kill_command,
    inspect_command,
    cp_command,
    snapshot,
    pool,
    serve_command,
    agent_command,
    doctor,
    init,
    template,
    kernel,
    version_command,
    completion_command,
    auth_group,
    policy_group,
    audit_group,
    secrets_group,
    certs_group,
):
    cli.add_command(command)


def main() -> None:
    try:
        # Named explicitly so `python -m tartarus` completes and reports like `tartarus`.
        cli(prog_name="tartarus", complete_var="_TARTARUS_COMPLETE", standalone_mode=True)
    except TartarusError as e:
        fail(e)
