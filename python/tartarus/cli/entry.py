"""The `tartarus` command's entry point: answers `--version` before anything is imported
(the interpreter's own start-up is most of what that costs), and hands every other
command to the click group in `tartarus.cli.main`."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from tartarus._core import __version__  # noqa: PLC0415

        # The line click's version option prints.
        sys.stdout.write(f"tartarus, version {__version__}\n")
        return
    from tartarus.cli.main import main as run  # noqa: PLC0415

    run()
