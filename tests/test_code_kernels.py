"""The code interpreters that run inside a sandbox, spoken to as CodeKernel speaks to
them, here run as host processes (the real node, bash and sh of this machine): each
keeps its state between cells, reports the last value, output and errors as events, and
survives an interrupt. `tests/test_sdk_e2e.py` runs them in sandboxes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tartarus.node.code_kernel import LANGUAGES

pytestmark = pytest.mark.timeout(60)

NONCE = "0123456789abcdef"
MARK = "\x1e" + NONCE + " "


class Kernel:
    def __init__(self, language: str, env: dict[str, str] | None = None) -> None:
        self.language = LANGUAGES[language]
        argv = self.language.argv(NONCE)
        need = argv[0]
        if shutil.which(need) is None:
            pytest.skip(f"{need} is not on this host's PATH (scripts/system-packages.txt)")
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **self.language.env, **(env or {})},
            text=False,
        )

    def run(
        self,
        code: str,
        *,
        interrupt_after_s: float | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Sends a cell; returns its events: results, stream text, error, done."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(self.language.encode(code, env or {}) + b"\n")
        self.process.stdin.flush()
        if interrupt_after_s is not None:
            time.sleep(interrupt_after_s)
            self.process.send_signal(signal.SIGINT)
        out: dict[str, Any] = {"results": [], "stdout": "", "stderr": "", "error": None}
        while True:
            line = self.process.stdout.readline().decode()
            assert line, f"the kernel exited: {self.process.stderr.read()!r}"  # type: ignore[union-attr]
            at = line.find(MARK)
            if at < 0:
                out["stdout"] += line
                continue
            out["stdout"] += line[:at]
            event = json.loads(line[at + len(MARK) :])
            if event["type"] == "done":
                out["count"] = event["count"]
                return out
            if event["type"] == "stream":
                out[event["name"]] += event["text"]
            elif event["type"] == "result":
                out["results"].append((event["data"], event["main"]))
            elif event["type"] == "error":
                out["error"] = event

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    k = Kernel(request.param)
    yield k
    k.close()


@pytest.mark.parametrize("kernel", ["javascript"], indirect=True)
def test_javascript_keeps_its_globals_and_reports_values(kernel: Kernel) -> None:
    assert kernel.run("")["results"] == []
    first = kernel.run("let n = 20;\nconst twice = (x) => x * 2;\nconsole.log('hi', n);\nn + 1")
    assert first["error"] is None
    assert first["stdout"] == "hi 20\n"
    assert first["results"] == [({"text": "21"}, True)]
    assert first["count"] == 2
    again = kernel.run("twice(n)")
    assert again["results"] == [({"text": "40"}, True)]
    shown = kernel.run("display({a: [1, 2]}); undefined")
    assert shown["results"] == [({"text": "{ a: [ 1, 2 ] }", "json": '{"a":[1,2]}'}, False)]
    warned = kernel.run("console.error('careful')")
    assert warned["stderr"] == "careful\n" and warned["results"] == []


@pytest.mark.parametrize("kernel", ["javascript"], indirect=True)
def test_javascript_errors_and_interrupts_leave_the_context(kernel: Kernel) -> None:
    kernel.run("var kept = 'yes'")
    failed = kernel.run("null.x")
    assert failed["error"]["name"] == "TypeError"
    assert "<cell 2>" in failed["error"]["traceback"]
    thrown = kernel.run("throw 'a string'")
    assert (thrown["error"]["name"], thrown["error"]["value"]) == ("Error", "a string")
    syntax = kernel.run("let = = 1")
    assert syntax["error"]["name"] == "SyntaxError"
    # The server's interrupt at a cell's timeout: the cell fails, the context lives.
    looped = kernel.run("while (true) {}", interrupt_after_s=0.5)
    assert "interrupted" in looped["error"]["value"]
    assert kernel.run("kept")["results"] == [({"text": "'yes'"}, True)]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_the_shell_keeps_variables_functions_and_directory(shell: str) -> None:
    path = os.environ["PATH"]
    if shell == "sh":
        # Without bash on the PATH the kernel runs in sh (the base template's busybox).
        bash = shutil.which("bash")
        path = ":".join(p for p in path.split(":") if bash is None or not bash.startswith(p))
    kernel = Kernel("bash", env={"PATH": path})
    try:
        assert kernel.run("")["error"] is None  # an empty cell is still one
        kernel.run('x=41\ngreet() { echo "hello $1"; }\ncd /tmp')
        out = kernel.run("greet $((x + 1)); pwd")
        assert out["stdout"] == "hello 42\n/tmp\n"
        assert out["error"] is None
        # Output without a newline, then the done event on the same line.
        partial = kernel.run("printf 'no newline'")
        assert partial["stdout"] == "no newline"
        failed = kernel.run("echo oops >&2; false")
        assert failed["error"]["value"] == "exit status 1"
        # Reading stdin sees nothing (it is the kernel's channel, not the cell's).
        assert kernel.run("cat; echo after")["stdout"] == "after\n"
        assert kernel.run("echo $x")["stdout"] == "41\n"
    finally:
        kernel.close()


# How each language prints an environment variable (or "unset").
PRINT_ENV = {
    "python": "import os; print(os.environ.get('TT_CELL', 'unset'))",
    "javascript": "console.log(process.env.TT_CELL ?? 'unset')",
    "bash": 'echo "${TT_CELL-unset}"',
}


@pytest.mark.parametrize("kernel", ["python", "javascript", "bash"], indirect=True)
def test_a_cells_own_variables_end_with_it(kernel: Kernel) -> None:
    printed = PRINT_ENV[kernel.language.name]
    awkward = 'it\'s $HOME "quoted" `and` \\ back'
    assert kernel.run(printed, env={"TT_CELL": awkward})["stdout"] == awkward + "\n"
    assert kernel.run(printed)["stdout"] == "unset\n"
    # A variable the context already had comes back after the cell.
    setup = {
        "python": "import os; os.environ['TT_CELL'] = 'before'",
        "javascript": "process.env.TT_CELL = 'before'",
        "bash": "export TT_CELL=before",
    }[kernel.language.name]
    kernel.run(setup)
    assert kernel.run(printed, env={"TT_CELL": "during"})["stdout"] == "during\n"
    assert kernel.run(printed)["stdout"] == "before\n"
    if kernel.language.name == "bash":
        # The cell's status survives the restore.
        assert kernel.run("false", env={"TT_CELL": "x"})["error"]["value"] == "exit status 1"


def test_a_shell_cell_refuses_variable_names_the_shell_cannot_take() -> None:
    from tartarus.errors import InvalidRequestError  # noqa: PLC0415

    with pytest.raises(InvalidRequestError, match="not a shell variable name: 1X, A-B"):
        LANGUAGES["bash"].encode("true", {"A-B": "1", "1X": "2", "OK": "3"})


@pytest.mark.parametrize("kernel", ["python"], indirect=True)
def test_python_renders_every_format_a_value_offers(kernel: Kernel) -> None:
    out = kernel.run(
        "class Rich:\n"
        "    def _repr_latex_(self): return r'$\\alpha$'\n"
        "    def _repr_javascript_(self): return 'alert(1)'\n"
        "    def _repr_markdown_(self): return '**b**'\n"
        "    def __repr__(self): return 'Rich()'\n"
        "class DataFrame:\n"  # the shape of pandas' DataFrame that the kernel reads
        "    size = 2\n"
        "    def to_json(self, orient, date_format):\n"
        '        return \'{"columns":["a"],"index":[0,1],"data":[[1],[2]]}\'\n'
        "display(Rich())\n"
        "DataFrame()"
    )
    (rich, shown), (frame, main) = out["results"]
    assert rich == {
        "latex": "$\\alpha$",
        "javascript": "alert(1)",
        "markdown": "**b**",
        "text": "Rich()",
    }
    assert not shown and main
    assert json.loads(frame["data"])["data"] == [[1], [2]]
