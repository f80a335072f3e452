"""tartarus.compat.e2b against E2B's real SDKs (`e2b`, `e2b_code_interpreter`, dev
dependencies, never called over the network): every public name and parameter they have
is ours too or is listed in DIFFERENCES, which docs/migrating-from-e2b.md explains; and
programs written the way E2B's documentation shows run against a real server with only
their import line changed."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import e2b_code_interpreter
import pytest
from e2b.sandbox_async.commands.command import Commands as E2BAsyncCommands
from e2b.sandbox_async.filesystem.filesystem import Filesystem as E2BAsyncFilesystem
from e2b.sandbox_sync.commands.command import Commands as E2BCommands
from e2b.sandbox_sync.filesystem.filesystem import Filesystem as E2BFilesystem

from tartarus.compat import e2b as compat
from tests.conftest import REPO_ROOT
from tests.support.server import Server

PROGRAMS = Path(__file__).parent / "e2b_programs"
IMPORT = re.compile(r"^from e2b(_code_interpreter)? import ", re.MULTILINE)

PAIRS: list[tuple[str, type, type]] = [
    ("Sandbox", e2b_code_interpreter.AsyncSandbox, compat.AsyncSandbox),
    ("Sandbox", e2b_code_interpreter.Sandbox, compat.Sandbox),
    ("Commands", E2BAsyncCommands, compat.Commands),
    ("Commands", E2BCommands, compat.SyncCommands),
    ("Filesystem", E2BAsyncFilesystem, compat.Filesystem),
    ("Filesystem", E2BFilesystem, compat.SyncFilesystem),
]
# The names an E2B program imports besides the sandbox classes.
MODULE_NAMES = {
    "AsyncSandbox",
    "Sandbox",
    "CommandExitException",
    "CommandResult",
    "Context",
    "EntryInfo",
    "Execution",
    "FilesystemEvent",
    "FilesystemEventType",
    "ExecutionError",
    "FileType",
    "OutputMessage",
    "Result",
    "SandboxInfo",
    "WriteInfo",
}


def public(cls: type) -> dict[str, object]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_")}


def parameters(member: object) -> list[str] | None:
    """The names a caller may pass (E2B's **opts API parameters are not names)."""
    if not callable(member):
        return None
    try:
        signature = inspect.signature(member)
    except (TypeError, ValueError):
        return None
    return [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def differences() -> tuple[set[str], set[str]]:
    """(what E2B has and we lack, what both have): `Class.name` / `Class.name(param)`."""
    missing: set[str] = set()
    shared: set[str] = set()
    for label, theirs, ours in PAIRS:
        mine = public(ours)
        for name, member in public(theirs).items():
            where = f"{label}.{name}"
            if name not in mine:
                missing.add(where)
                continue
            shared.add(where)
            their_params, my_params = parameters(member), parameters(mine[name])
            for param in their_params or []:
                if my_params is not None and param in my_params:
                    shared.add(f"{where}({param})")
                else:
                    missing.add(f"{where}({param})")
    return missing, shared


def test_every_difference_from_e2b_is_listed() -> None:
    missing, shared = differences()
    unlisted = sorted(missing - set(compat.DIFFERENCES))
    assert unlisted == [], f"E2B has these and tartarus.compat.e2b does not: {unlisted}"
    # A listed entry is either still missing or a difference in behaviour of a shared
    # name (such as callbacks that run after the cell); none is stale.
    stale = sorted(set(compat.DIFFERENCES) - missing - shared)
    assert stale == []


def test_every_listed_difference_is_explained() -> None:
    doc = (REPO_ROOT / "docs" / "migrating-from-e2b.md").read_text()
    unexplained = [name for name in compat.DIFFERENCES if f"`{name}`" not in doc]
    assert unexplained == []


def test_the_module_has_the_names_e2b_programs_import() -> None:
    assert set(dir(e2b_code_interpreter)) >= MODULE_NAMES
    assert set(compat.__all__) >= MODULE_NAMES


def test_positional_order_matches_where_both_have_the_parameters() -> None:
    """E2B programs pass arguments by position too (`sbx.run_code(code, "python")`)."""
    for label, theirs, ours in PAIRS:
        mine = public(ours)
        for name, member in public(theirs).items():
            # E2B's connect is also an instance method (`sbx.connect(timeout)`); its
            # class form, `Sandbox.connect(sandbox_id, ...)`, is the one ours has.
            if name not in mine or name == "connect":
                continue
            their_params, my_params = parameters(member) or [], parameters(mine[name]) or []
            common = [p for p in their_params if p in my_params]
            head = their_params[: len(common)]
            if head == common:
                assert my_params[: len(common)] == common, (label, name)


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


def run_ported(server: Server, name: str, tmp_path: Path) -> list[str]:
    source = (PROGRAMS / name).read_text()
    assert IMPORT.search(source), "the program imports E2B's SDK"
    ported = IMPORT.sub("from tartarus.compat.e2b import ", source)
    changed = [
        (a, b) for a, b in zip(source.splitlines(), ported.splitlines(), strict=True) if a != b
    ]
    assert changed and all(a.startswith("from e2b") for a, _ in changed)
    path = tmp_path / name
    path.write_text(ported)
    done = subprocess.run(
        [sys.executable, str(path)],
        env=dict(server.env, TARTARUS_URL=server.url),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@pytest.mark.timeout(900)
def test_code_interpreter_program_runs_with_its_import_changed(
    server: Server, tmp_path: Path
) -> None:
    assert run_ported(server, "code_interpreter.py", tmp_path) == [
        "x: 50",
        "logs: ['hello world\\n']",
        "error: ZeroDivisionError division by zero",
        "context: 'in a context'",
        "streamed: ['a\\n', 'b\\n']",
        "cell env: per cell; after: unset",
        "root has tmp: True",
        "id: True",
    ]


@pytest.mark.timeout(900)
def test_async_sdk_program_runs_with_its_import_changed(server: Server, tmp_path: Path) -> None:
    out = run_ported(server, "sandbox_async.py", tmp_path)
    assert out[0].startswith("run: hi from /")
    assert out[1:] == [
        "callbacks: ['one', 'two']",
        "exit exception: 7 nope",
        "background pid: True",
        "listed: True",
        "killed: True",
        "wrote: /tmp/data/hello.txt file",
        "read: hello file",
        "exists: True",
        "list: [('hello.txt', 'file', 10)]",
        "watched: ['create']",
        "info: e2b-compat",
        "running: True",
        "kill: True",
    ]


@pytest.mark.anyio
async def test_an_argument_e2b_has_and_we_lack_is_a_type_error_not_ignored() -> None:
    with pytest.raises(TypeError, match="does not support mcp, secure"):
        await compat.AsyncSandbox.create(secure=True, mcp={})
    with pytest.raises(TypeError, match="does not support lifecycle"):
        await compat.AsyncSandbox.connect("sb-0123456789abcdef", lifecycle={})
