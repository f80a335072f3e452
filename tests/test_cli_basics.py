"""CLI commands against a real server, for what needs no sandbox: JSON output, exit
codes for missing sandboxes and bad usage, version, completion."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tartarus.cli.output import print_table
from tests.support.server import Server, cli, running_server, server_env

pytestmark = pytest.mark.timeout(120)

MISSING = "sb-0000000000000000"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("cli")) as s:
        yield s


def test_version_json(server: Server) -> None:
    out = cli(server, "version", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["client"] == doc["server"]["version"]
    assert doc["server"]["api"] == "v1"


def test_version_without_a_server_says_so(tmp_path: Path) -> None:
    env = server_env(tmp_path, TARTARUS_URL=f"unix:{tmp_path}/nobody.sock")
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "version", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0
    doc = json.loads(out.stdout)
    assert doc["server"] is None
    assert "no Tartarus server answers" in doc["server_error"]


def test_unreachable_server_exit_code(tmp_path: Path) -> None:
    env = server_env(tmp_path, TARTARUS_URL=f"unix:{tmp_path}/nobody.sock")
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "ps"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 69
    assert b"no Tartarus server answers" in out.stderr


def test_ps_json_is_a_list(server: Server) -> None:
    out = cli(server, "ps", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    out = cli(server, "ps", "-a", "-q")
    assert out.returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ("inspect", MISSING),
        ("kill", MISSING),
        ("logs", MISSING),
        ("exec", MISSING, "--", "true"),
        ("cp", f"{MISSING}:/etc/hostname", "-"),
    ],
)
def test_missing_sandbox_exits_3(server: Server, args: tuple[str, ...]) -> None:
    out = cli(server, *args)
    assert out.returncode == 3, (out.stdout, out.stderr)
    assert b"not found" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("cp", "a", "b"),
        ("run",),
        ("ps", "--metadata", "novalue"),
        ("kill",),
    ],
)
def test_usage_errors_exit_2(server: Server, args: tuple[str, ...]) -> None:
    out = cli(server, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(server: Server, shell: str) -> None:
    out = cli(server, "completion", shell)
    assert out.returncode == 0
    assert b"_TARTARUS_COMPLETE" in out.stdout


def test_completion_completes_commands(server: Server) -> None:
    env = dict(
        server.env, _TARTARUS_COMPLETE="bash_complete", COMP_WORDS="tartarus ex", COMP_CWORD="1"
    )
    out = subprocess.run(
        [sys.executable, "-m", "tartarus"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert "exec" in out.stdout


def test_version_flag_answers_without_loading_the_cli() -> None:
    """`tartarus --version` is the interpreter's start-up and little more: nothing of the
    CLI (click, the commands) is imported for it; its output is click's version line."""
    from tartarus import __version__  # noqa: PLC0415

    probe = (
        "import sys; from tartarus.cli.entry import main; sys.argv = ['tartarus', '--version']; "
        "main(); print(sorted(m for m in sys.modules "
        "if m == 'click' or m.startswith('tartarus.cli.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out == f"tartarus, version {__version__}\n['tartarus.cli.entry']\n"
    # Anything else goes to the click group, whose version option prints the same line.
    both = subprocess.run(
        [sys.executable, "-m", "tartarus", "--version", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert both.stdout == f"tartarus, version {__version__}\n"


@pytest.mark.parametrize("args", [("ps",), ("ps", "-a", "--json"), ("run", "--help")])
def test_listing_and_running_do_not_load_rich(server: Server, args: tuple[str, ...]) -> None:
    """rich costs more to import than these commands' own work: `ps` prints its table
    itself, `run` and `--json` print no table."""
    probe = (
        "import sys; from tartarus.cli.entry import main; "
        f"sys.argv = ['tartarus', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('rich' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=dict(server.env, TARTARUS_URL=server.url),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stderr.strip().splitlines()[-1] == "False", out.stderr


def test_tables_align_their_columns(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(("ID", "STATE"), [("sb-1", "running"), ("sb-long-id", "-")])
    assert capsys.readouterr().out == ("ID          STATE\nsb-1        running\nsb-long-id  -\n")
