"""Entry point of the `tartarus` command: a click group that gathers the subcommands.

The group imports a command's module only when that command runs (or `--help` lists
them all): the server, the SDK's HTTP client and the fleet pull in aiohttp, redis and
more, which `tartarus version --client-only` or `tartarus template list` never need.
"""

from __future__ import annotations

import importlib
import signal
import sys
from typing import Any

import click

from tartarus import __version__
from tartarus.errors import TartarusError

EXIT_INTERRUPTED = 128 + signal.SIGINT

# Command name -> (module, attribute), in the order `--help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tartarus.cli.sandboxes", "run_command"),
    "exec": ("tartarus.cli.sandboxes", "exec_command"),
    "ps": ("tartarus.cli.sandboxes", "ps_command"),
    "logs": ("tartarus.cli.sandboxes", "logs_command"),
    "kill": ("tartarus.cli.sandboxes", "kill_command"),
    "pause": ("tartarus.cli.sandboxes", "pause_command"),
    "resume": ("tartarus.cli.sandboxes", "resume_command"),
    "inspect": ("tartarus.cli.sandboxes", "inspect_command"),
    "port": ("tartarus.cli.sandboxes", "port_command"),
    "cp": ("tartarus.cli.files", "cp_command"),
    "snapshot": ("tartarus.cli.snapshots", "snapshot"),
    "pool": ("tartarus.cli.snapshots", "pool"),
    "serve": ("tartarus.cli.serve", "serve_command"),
    "agent": ("tartarus.cli.agent", "agent_command"),
    "mcp": ("tartarus.cli.mcp", "mcp_command"),
    "doctor": ("tartarus.cli.doctor", "doctor"),
    "init": ("tartarus.cli.init", "init"),
    "template": ("tartarus.cli.template", "template"),
    "kernel": ("tartarus.cli.kernel", "kernel"),
    "runsc": ("tartarus.cli.runsc", "runsc"),
    "version": ("tartarus.cli.about", "version_command"),
    "completion": ("tartarus.cli.about", "completion_command"),
    "auth": ("tartarus.cli.auth", "auth_group"),
    "policy": ("tartarus.cli.policy", "policy_group"),
    "audit": ("tartarus.cli.audit", "audit_group"),
    "secrets": ("tartarus.cli.secrets", "secrets_group"),
    "certs": ("tartarus.cli.certs", "certs_group"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        command = getattr(importlib.import_module(where[0]), where[1])
        if not isinstance(command, click.Command):
            raise TypeError(f"{where[0]}.{where[1]} is not a click command")
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            # Ctrl-C ends any command quietly, with the shell's status for SIGINT
            # (click would print "Aborted!" and exit 1).
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tartarus")
def cli() -> None:
    """Tartarus: run untrusted code in sandboxes that start in milliseconds."""


def main() -> None:
    try:
        # Named explicitly so `python -m tartarus` completes and reports like `tartarus`.
        cli(prog_name="tartarus", complete_var="_TARTARUS_COMPLETE", standalone_mode=True)
    except TartarusError as e:
        from tartarus.cli.remote import fail  # noqa: PLC0415 (its imports are for errors only)

        fail(e)
