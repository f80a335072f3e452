"""Every ```console block of the README and docs/*.md runs as written.

A block is a shell session: its lines starting with `$ ` are typed, top to bottom, into
one interactive bash on a pseudo-terminal (so variables carry over and the CLI prints
for people, not `--json`); the lines after a command, up to the next `$ `, are sample
output and are not checked. The block's working directory is a fresh `tmp_path`; every
block talks to one server for the module, with its own runtime and state directories
(the CLI finds it where it finds the local server, `$XDG_RUNTIME_DIR/tartarus`). No line
may print a Python traceback, and each must end with status 0 unless its comment says
otherwise. What the comments may say, in words a reader understands too:

- `# exits N ...`: the line ends with status N; `# exits N without full KVM ...` only
  on a host whose KVM cannot run a full guest (the doctor's probe), else 0.
- `` # ... type `TEXT` ... ``: an interactive program; TEXT and Enter are typed once it
  waits for input.
- `# ... Ctrl-C ...`: runs until stopped; Ctrl-C is pressed once it waits (status 130).

An HTML comment right before the block, `<!-- console: needs=WHAT[,WHAT] -->`, names
what the block needs of the host: `root`; `isolation` (a backend for untrusted work,
microvm or gvisor, which `auto` picks); or `kernel` (the guest kernel already built
and cached for the current inputs: building it takes minutes, and the kernel tests do
it). A block whose needs the host lacks is skipped with the measured reason.
`timeout=S` there sets the block's time limit (default 180 s).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tartarus.config import load_settings
from tartarus.host.doctor import DoctorReport
from tests.conftest import REPO_ROOT
from tests.support.server import processes_mentioning, running_server, server_env, short_dir
from tests.support.terminal import TRACEBACK, Shell

pytestmark = pytest.mark.timeout(900)

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
ANNOTATION = re.compile(r"^<!--\s*console:(?P<body>.*?)-->$")
EXITS = re.compile(r"#.*?\bexits (?P<code>\d+)(?P<kvm> without full KVM)?")
TYPED = re.compile(r"#.*?\btype `(?P<text>[^`]+)`")
INTERRUPT = re.compile(r"#.*\bCtrl-C\b")
DEFAULT_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Command:
    line: str
    number: int

    @property
    def typed(self) -> str | None:
        match = TYPED.search(self.line)
        return match.group("text") if match else None

    @property
    def interrupt(self) -> bool:
        return INTERRUPT.search(self.line) is not None

    def expected(self, full_kvm: bool) -> int:
        match = EXITS.search(self.line)
        if match is None:
            return 130 if self.interrupt else 0
        if match.group("kvm") and full_kvm:
            return 0
        return int(match.group("code"))


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    commands: tuple[Command, ...]
    needs: tuple[str, ...]
    timeout: float

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def console_blocks(paths: list[Path]) -> Iterator[Block]:
    for path in paths:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() != "```console":
                i += 1
                continue
            start = i
            previous = next((x.strip() for x in reversed(lines[:start]) if x.strip()), "")
            settings: dict[str, str] = {}
            if m := ANNOTATION.match(previous):
                for item in m.group("body").split():
                    key, _, value = item.partition("=")
                    settings[key] = value
            commands = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                if lines[i].startswith("$ "):
                    commands.append(Command(lines[i][2:], i + 1))
                i += 1
            yield Block(
                doc=str(path.relative_to(REPO_ROOT)),
                line=start + 1,
                commands=tuple(commands),
                needs=tuple(x for x in settings.get("needs", "").split(",") if x),
                timeout=float(settings.get("timeout", DEFAULT_TIMEOUT_S)),
            )
            i += 1


BLOCKS = list(console_blocks(DOCS))


def missing(need: str, report: DoctorReport) -> str | None:
    """Why this host cannot give a block `need`, or None if it can."""
    if need == "isolation":
        verdicts = {name: report.backend(name) for name in ("microvm", "gvisor")}
        if any(v.available for v in verdicts.values()):
            return None
        return "no backend for untrusted work: " + "; ".join(
            f"{name}: {v.reason}" for name, v in verdicts.items()
        )
    if need == "root":
        return None if os.geteuid() == 0 else f"needs root (euid is {os.geteuid()})"
    if need == "kernel":
        from tartarus.guest import kernel_build  # noqa: PLC0415

        cache = load_settings().cache_dir
        try:
            inputs = kernel_build.compute_inputs()
        except (OSError, kernel_build.KernelBuildError) as e:
            return f"the guest kernel cannot be built here: {e}"
        if kernel_build.cached_kernel(cache, inputs) is None:
            where = kernel_build.kernel_dir(cache, inputs.kernel_id())
            return f"no guest kernel cached at {where} (a first build takes 5-8 minutes)"
        return None
    raise AssertionError(f"unknown need {need!r} in a console block annotation")


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of every block: `tartarus` on PATH and the module's own server
    found where the CLI looks for the local one (a short runtime path: sockets)."""
    base = tmp_path_factory.mktemp("docs")
    with short_dir() as runtime:
        env = server_env(base, XDG_RUNTIME_DIR=str(runtime), XDG_CONFIG_HOME=str(base / "cfg"))
        env["TARTARUS_RUNTIME_DIR"] = str(runtime / "tartarus")  # where XDG puts it
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with running_server(base, env=env) as server:
            assert server.socket_path == runtime / "tartarus" / "tartarus.sock"
            yield env
        assert processes_mentioning(str(runtime)) == []


def test_blocks_were_found() -> None:
    assert len(BLOCKS) >= 10
    assert all(block.commands for block in BLOCKS), [b.id for b in BLOCKS if not b.commands]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_console_block_runs_as_written(
    block: Block, docs_env: dict[str, str], tmp_path: Path, doctor_report: DoctorReport
) -> None:
    reasons = [reason for need in block.needs if (reason := missing(need, doctor_report))]
    if reasons:
        pytest.skip("; ".join(reasons))
    full_kvm = doctor_report.kernel.kvm.full_guests
    deadline = time.monotonic() + block.timeout
    shell = Shell(docs_env, tmp_path)
    try:
        for command in block.commands:
            left = deadline - time.monotonic()
            assert left > 0, f"{block.id}: out of time before line {command.number}"
            code, shown = shell.run(
                command.line, typed=command.typed, interrupt=command.interrupt, timeout=left
            )
            where = f"{block.doc}:{command.number}: $ {command.line}\n{shown}"
            assert TRACEBACK not in shown, where
            assert code == command.expected(full_kvm), where
    finally:
        shell.close()
