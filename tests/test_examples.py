"""The programs in examples/ run as a user runs them (`python examples/X.py`), against
a real server with a real backend, and print what their docstrings promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.server import Server

pytestmark = pytest.mark.timeout(900)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    return shared_server


def run_example(server: Server, name: str, cwd: Path) -> str:
    env = dict(server.env, TARTARUS_URL=server.url)
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / name)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def test_agent_loop_retries_after_reading_the_error(server: Server, tmp_path: Path) -> None:
    out = run_example(server, "agent_loop.py", tmp_path)
    assert out.splitlines() == [
        "turn 1: NameError: name 'wordz' is not defined; asking the model again",
        "turn 2: ok, the answer is 3.89",
    ]


def test_data_analysis_returns_a_png_chart(server: Server, tmp_path: Path) -> None:
    out = run_example(server, "data_analysis.py", tmp_path)
    assert "busiest month: row 5; chart.png written (1 chart)" in out
    assert "mean" in out and "240" in out
    assert "last rows: [['May', 190], ['Jun', 240]] (html too)" in out
    chart = (tmp_path / "chart.png").read_bytes()
    assert chart.startswith(PNG_MAGIC)
    assert len(chart) > 2000


def test_mcp_session(server: Server, tmp_path: Path) -> None:
    out = run_example(server, "mcp_session.py", tmp_path)
    lines = out.splitlines()
    assert lines[0] == (
        "tools: create_sandbox, kill_sandbox, list_files, read_file, run_code, "
        "run_command, write_file"
    )
    assert lines[2:] == ["'the answer is 42'", "killed"]


def test_examples_are_all_tested() -> None:
    tested = {"agent_loop.py", "data_analysis.py", "mcp_session.py", "quickstart.py"}
    assert {p.name for p in (REPO_ROOT / "examples").glob("*.py")} == tested
