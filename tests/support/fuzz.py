"""Fuzzes the live API with schemathesis: a fresh `tartarus serve` on loopback TCP with
the real backend, every operation, schemathesis' default checks (no 5xx, status codes,
content types, headers and bodies as documented, valid data accepted, invalid data
refused), then stateful sequences built from the documented links.

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
OUR_TAGS = ("service", "sandboxes", "exec", "processes", "files", "logs", "code", "templates")


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
            # The sandbox API (this module's scope); auth, policies and audit have theirs.
            *[arg for tag in OUR_TAGS for arg in ("--include-tag", tag)],
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
        url = next(arg for arg in command if arg.endswith("/v1/openapi.json"))
        origin = url.split("/v1")[0]
        shown = " ".join(["schemathesis", *command[1:]]).replace(origin, "http://127.0.0.1:PORT")
        shown = shown.replace(str(CONFIG), "tests/support/schemathesis.toml")
        args.markdown.write_text(
            "# API fuzzing (schemathesis)\n\n"
            f"Run on {dt.date.today().isoformat()} with\n\n"
            "```console\n"
            f"$ .venv/bin/python -m tests.support.fuzz --max-examples {args.max_examples} "
            f"--seed {args.seed} --markdown {args.markdown}\n"
            "```\n\n"
            "which starts a fresh `tartarus serve` with the real backend and runs\n\n"
            f"```console\n$ {shown}\n```\n\n"
            f"Exit code: {code}\n\n```text\n{output.strip()}\n```\n"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
