"""Start-up cost of the `tartarus` command.

Each command runs as a fresh process (what a shell or a script pays), beside two peers
measured in the same run: the interpreter doing nothing (`python -c pass`, the floor
any Python CLI stands on) and `git --version` (a native CLI). Measured: `tartarus
--version`, `tartarus version --client-only`, and `tartarus template list` (a cache hit:
it reads the local template store and builds nothing), with `--json` and as a table.

Run: `python -m benches.bench_cli` (results in benches/results/cli.json).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benches.harness import Stats, measure, ratio, report, write_result

RUNS = 20
TARTARUS = str(Path(sys.executable).with_name("tartarus"))

OURS = {
    "tartarus --version": [TARTARUS, "--version"],
    "tartarus version --client-only": [TARTARUS, "version", "--client-only"],
    "tartarus template list --json": [TARTARUS, "template", "list", "--json"],
    "tartarus template list": [TARTARUS, "template", "list"],
}


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stats(argv: list[str]) -> Stats:
    return measure(lambda: _run(argv), runs=RUNS, warmup=2)


def main() -> None:
    python = _stats([sys.executable, "-c", "pass"])
    git_path = shutil.which("git")
    git = _stats([git_path, "--version"]) if git_path else None
    results: dict[str, Any] = {
        "runs": RUNS,
        "peers": {"python -c pass": python, "git --version": git},
        "commands": {},
    }
    for label, argv in OURS.items():
        ours = _stats(argv)
        report(label, ours, python, "python -c pass")
        if git is not None:
            report(label, ours, git, "git --version")
        results["commands"][label] = {
            "stats": ours,
            "ratio_to_python": ratio(ours, python),
            "ratio_to_git": None if git is None else ratio(ours, git),
        }
    print(f"wrote {write_result('cli', results)}")


if __name__ == "__main__":
    main()
