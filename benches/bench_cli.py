"""Start-up cost of the `tartarus` command.

Each command runs as a fresh process (what a shell or a script pays), beside two peers
measured in the same run: the interpreter doing nothing (`python -c pass`, the floor
any Python CLI stands on) and `git --version` (a native CLI). Measured: `tartarus
--version`, `tartarus version --client-only`, and `tartarus template list` (a cache hit:
it reads the local template store and builds nothing), with `--json` and as a table;
then, against a server the bench starts, `tartarus ps` and `tartarus run -b jail
--trusted -- true` (a sandbox made, run and removed: the server's part is in it too).

Run: `python -m benches.bench_cli` (results in benches/results/cli.json).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.support.server import running_server, server_env

from benches.harness import Stats, measure, ratio, report, write_result

RUNS = 20
TARTARUS = str(Path(sys.executable).with_name("tartarus"))

OURS = {
    "tartarus --version": [TARTARUS, "--version"],
    "tartarus version --client-only": [TARTARUS, "version", "--client-only"],
    "tartarus template list --json": [TARTARUS, "template", "list", "--json"],
    "tartarus template list": [TARTARUS, "template", "list"],
}


# Against a server (TARTARUS_URL); `run` needs the jail (root).
WITH_SERVER = {
    "tartarus ps": [TARTARUS, "ps"],
    "tartarus run -b jail --trusted -- true": [
        TARTARUS,
        "run",
        "-b",
        "jail",
        "--trusted",
        "--",
        "true",
    ],
}


def _run(argv: list[str], env: dict[str, str] | None = None) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _stats(argv: list[str], env: dict[str, str] | None = None) -> Stats:
    return measure(lambda: _run(argv, env), runs=RUNS, warmup=2)


def _record(
    results: dict[str, Any], label: str, ours: Stats, python: Stats, git: Stats | None
) -> None:
    report(label, ours, python, "python -c pass")
    if git is not None:
        report(label, ours, git, "git --version")
    results["commands"][label] = {
        "stats": ours,
        "ratio_to_python": ratio(ours, python),
        "ratio_to_git": None if git is None else ratio(ours, git),
    }


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
        _record(results, label, _stats(argv), python, git)
    base = Path(tempfile.mkdtemp(prefix="tb-cli-", dir="/tmp"))
    try:
        with running_server(base, env=server_env(base)) as server:
            env = dict(server.env, TARTARUS_URL=server.url)
            for label, argv in WITH_SERVER.items():
                if "jail" in argv and os.geteuid() != 0:
                    print(f"{label}: skipped (the jail needs root)")
                    continue
                _record(results, label, _stats(argv, env), python, git)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"wrote {write_result('cli', results)}")


if __name__ == "__main__":
    main()
