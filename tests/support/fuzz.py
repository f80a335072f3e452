"""Fuzzes the live API with schemathesis: a fresh `tartarus serve` on loopback TCP with
the real backend, every operation (sandboxes, exec, files, logs, snapshots, pools,
templates, API keys, policies, audit), schemathesis' default checks (no 5xx, status
codes, content types, headers and bodies as documented, valid data accepted, invalid data
refused), then stateful sequences built from the document's links (a created sandbox's
id into every operation on it, a background process's pid into its stream, and so on).
Per-operation settings, each with its reason, are in schemathesis.toml beside this file.

    .venv/bin/python -m tests.support.fuzz [--max-examples N] [--markdown docs/api-fuzzing.md]

Exits with schemathesis' exit code; `--markdown` writes the command and its output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from tests.support.server import running_server

CONFIG = Path(__file__).with_name("schemathesis.toml")


def run(max_examples: int, seed: int, workdir: Path) -> tuple[list[str], int, str]:
    schemathesis = Path(sysconfig.get_path("scripts")) / "schemathesis"
    with running_server(workdir) as server:
        assert server.tcp_url is not None
        command = [
            str(schemathesis),
            "--config-file",
            str(CONFIG),
            "run",
            f"{server.tcp_url}/v1/openapi.json",
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--request-timeout",
            "120",
            "--generation-allow-x00",
            "false",
        ]
        out = subprocess.run(command, capture_output=True, text=True, timeout=3000, check=False)
        healthy = server.raw("GET", "/v1/health").status == 200
        if not healthy:
            return command, 1, out.stdout + "\nthe server stopped answering after the run\n"
    return command, out.returncode, out.stdout + out.stderr


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-examples", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tartarus-fuzz-"))
    try:
        command, code, output = run(args.max_examples, args.seed, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(output)
    if args.markdown is not None:
        origin = next(arg for arg in command if arg.endswith("/v1/openapi.json")).split("/v1")[0]
        repo = str(Path(__file__).parents[2]) + "/"
        shown = " ".join(["schemathesis", *command[1:]])
        output = output.replace(repo, "")
        shown = shown.replace(origin, "http://127.0.0.1:PORT").replace(repo, "")
        args.markdown.write_text(
            "# API fuzzing (schemathesis)\n\n"
            f"Run on {dt.date.today().isoformat()} in a checkout (it rewrites this page) with\n\n"
            "```sh\n"
            f".venv/bin/python -m tests.support.fuzz --max-examples {args.max_examples} "
            f"--seed {args.seed} --markdown {args.markdown}\n"
            "```\n\n"
            "which starts a fresh `tartarus serve` with the real backend and runs\n\n"
            f"```sh\n{shown}\n```\n\n"
            "Every operation but two is fuzzed (sandboxes, exec, processes, files, logs, "
            "code, snapshots, pools, templates, API keys, policies, audit, service). The "
            "document's OpenAPI links (from `provides` on a route's reply) carry a created "
            "sandbox's id, a background process's pid, a key's id, a policy's name and a "
            "snapshot's id into the operations that need them, so the stateful phase "
            "reaches them. `tests/support/schemathesis.toml` holds the per-operation "
            "settings, each with its reason: operations that refuse schema-valid input with "
            "422 for what it means (a missing program or cwd, an unknown role, a policy "
            "document that does not validate, a cell for a code context of another "
            "language), a short read of `?follow=true` log streams, "
            "which last as long as the sandbox, and two left out: reattaching to a process "
            "(`GET .../processes/{pid}/stream`) follows the process until it exits, and a "
            "code context's interpreter lives as long as its sandbox (tests/test_server_e2e.py "
            "and the SDK's `commands.connect` test cover it); watching a directory "
            "(`GET .../files/watch`) streams until its client leaves, silently while nothing "
            "changes (the SDK's watch test covers it). `tests/test_api_fuzz.py` runs the "
            "same with `--max-examples 5 --seed 7` in the suite.\n\n"
            f"Exit code: {code}\n\n```text\n{output.strip()}\n```\n"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
