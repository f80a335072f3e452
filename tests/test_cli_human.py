"""Every command group of `tartarus` in its human form (no `--json`), on a terminal,
against one real server: the exit code, no Python traceback, and the words a person
reads. Bad input (an unknown template field, a missing file, an unknown sandbox) is one
clear `error:` line and a non-zero exit."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import Server, running_server, server_env
from tests.support.terminal import Shown, on_terminal

pytestmark = pytest.mark.timeout(300)

MISSING = "sb-0000000000000000"
SANDBOX_ID = re.compile(r"\bsb-[0-9a-f]{16}\b")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("cli-human")
    with running_server(base, env=server_env(base)) as s:
        yield s


def tt(
    server: Server,
    *args: str,
    cwd: Path | None = None,
    typed: tuple[bytes, ...] = (),
    after: bytes = b"",
) -> Shown:
    """`tartarus ARGS` on a terminal against `server`; never a traceback."""
    env = dict(server.env, TARTARUS_URL=server.url)
    shown = on_terminal(*args, env=env, cwd=cwd, typed=typed, after=after)
    assert not shown.traceback, shown.text
    return shown


def one_error(shown: Shown, *words: str) -> None:
    """A non-zero exit and one `error:` line, the last shown, that says `words` (a
    spinner or progress bar may have been drawn, and erased, before it)."""
    assert shown.code != 0, shown.text
    lines = [x for x in shown.text.splitlines() if x.strip()]
    errors = [x for x in lines if "error:" in x]
    assert len(errors) == 1 and lines[-1].startswith("error: "), shown.text
    for word in words:
        assert word in lines[-1], shown.text


@pytest.fixture(scope="module")
def sandbox(server: Server) -> str:
    shown = tt(server, "run", "-b", "jail", "--trusted", "--keep", "-q", "--", "echo in-sandbox")
    assert shown.code == 0, shown.text
    found = SANDBOX_ID.fullmatch(shown.text.strip())
    assert found, shown.text
    return found.group(0)


def test_run_prints_the_output_and_passes_the_exit_code(server: Server) -> None:
    shown = tt(server, "run", "-b", "jail", "--trusted", "--explain", "--", "echo hi; exit 5")
    assert shown.code == 5
    assert "backend: jail" in shown.text and "hi\n" in shown.text


def test_run_on_a_backend_that_cannot_run_it_says_why(server: Server) -> None:
    shown = tt(server, "run", "-b", "wasm", "--", "true")
    one_error(shown, "wasm backend")
    assert shown.code == 69


def test_exec_ps_logs_cp_inspect(server: Server, sandbox: str, tmp_path: Path) -> None:
    shown = tt(server, "exec", sandbox, "--", "sh", "-c", "echo from-exec; exit 3")
    assert shown.code == 3 and "from-exec" in shown.text
    shown = tt(server, "exec", sandbox, "--", "sh", typed=(b"echo $((6*7)); exit\r",), after=b"# ")
    assert shown.code == 0 and "42" in shown.text
    shown = tt(server, "ps")
    assert shown.code == 0 and "TEMPLATE" in shown.text and sandbox in shown.text
    shown = tt(server, "logs", sandbox)
    assert shown.code == 0 and "in-sandbox" in shown.text and "from-exec" in shown.text
    (tmp_path / "in.txt").write_text("copied\n")
    assert tt(server, "cp", "in.txt", f"{sandbox}:/tmp/in.txt", cwd=tmp_path).code == 0
    shown = tt(server, "cp", f"{sandbox}:/tmp/in.txt", "-")
    assert shown.code == 0 and "copied" in shown.text
    shown = tt(server, "inspect", sandbox)
    assert shown.code == 0 and '"state": "running"' in shown.text


def test_kill_then_the_sandbox_is_not_running(server: Server) -> None:
    shown = tt(server, "run", "-b", "jail", "--trusted", "--keep", "-q", "--", "true")
    sb = shown.text.strip()
    shown = tt(server, "kill", sb)
    assert shown.code == 0 and sb in shown.text
    shown = tt(server, "exec", sb, "--", "true")
    assert shown.code == 4
    assert "error:" in shown.text


@pytest.mark.parametrize(
    "args",
    [
        ("exec", MISSING, "--", "true"),
        ("logs", MISSING),
        ("kill", MISSING),
        ("inspect", MISSING),
        ("cp", f"{MISSING}:/etc/hostname", "-"),
        ("snapshot", "create", MISSING),
    ],
    ids=lambda a: a[0] if isinstance(a, tuple) else a,
)
def test_an_unknown_sandbox_is_one_error_line(server: Server, args: tuple[str, ...]) -> None:
    shown = tt(server, *args)
    one_error(shown, "not found")
    assert shown.code == 3


def test_snapshot_and_pool_listings(server: Server) -> None:
    shown = tt(server, "snapshot", "list")
    assert shown.code == 0, shown.text
    shown = tt(server, "pool", "ls")
    assert shown.code == 0, shown.text


def test_snapshot_of_a_jail_sandbox_is_a_clear_error(server: Server, sandbox: str) -> None:
    """The spinner (rich Status) around the request must not hide the server's answer."""
    shown = tt(server, "snapshot", "create", sandbox)
    assert shown.code != 0
    assert "error:" in shown.text


def test_template_init_build_list_inspect(server: Server, tmp_path: Path) -> None:
    shown = tt(server, "init", "template", "myapp", "--from", "base", cwd=tmp_path)
    assert shown.code == 0 and "wrote myapp.yaml" in shown.text
    shown = tt(server, "template", "build", "myapp.yaml", "--no-ext4", cwd=tmp_path)
    assert shown.code == 0, shown.text
    assert "built myapp" in shown.text and "rootfs" in shown.text
    shown = tt(server, "template", "list")
    assert shown.code == 0 and "myapp" in shown.text and "base" in shown.text
    shown = tt(server, "template", "inspect", "myapp")
    assert shown.code == 0 and "template myapp" in shown.text
    shown = tt(server, "template", "inspect", "nosuch")
    one_error(shown, "no template named 'nosuch'")
    assert shown.code == 3


def test_template_file_with_an_unknown_field(server: Server, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("id: bad\nbase: {kind: debian}\ncolour: blue\n")
    shown = tt(server, "template", "build", "bad.yaml", cwd=tmp_path)
    one_error(shown, "colour")


def test_template_build_of_a_missing_file(server: Server, tmp_path: Path) -> None:
    shown = tt(server, "template", "build", "nowhere.yaml", cwd=tmp_path)
    one_error(shown, "nowhere.yaml")


def test_doctor_version_completion(server: Server) -> None:
    shown = tt(server, "doctor")
    assert shown.code == 0 and "KVM flavour" in shown.text and "jail" in shown.text
    shown = tt(server, "version")
    assert shown.code == 0 and "client" in shown.text
    shown = tt(server, "completion", "bash")
    assert shown.code == 0 and "_TARTARUS_COMPLETE" in shown.text


def test_kernel_list_and_verify(server: Server, tmp_path: Path) -> None:
    shown = tt(server, "kernel", "list")
    assert shown.code == 0 and "guest kernels in" in shown.text
    (tmp_path / "config").write_text("CONFIG_X=y\n")
    shown = tt(server, "kernel", "verify", "--config", str(tmp_path / "config"))
    assert shown.code == 1 and "hardening options checked" in shown.text


def test_kernel_build_from_a_missing_source(server: Server, tmp_path: Path) -> None:
    """On a terminal the build draws progress bars: a failure still reads as one line."""
    shown = tt(server, "kernel", "build", "--source", str(tmp_path / "none.tar.xz"))
    one_error(shown, "none.tar.xz")


def test_auth_policy_audit(server: Server, tmp_path: Path) -> None:
    shown = tt(server, "auth", "whoami")
    assert shown.code == 0 and "tenant:" in shown.text and "roles:" in shown.text
    shown = tt(server, "auth", "keys", "create", "--name", "ci", "--role", "developer")
    assert shown.code == 0 and "it is shown only" in shown.text
    shown = tt(server, "auth", "keys", "list")
    assert shown.code == 0 and "ci" in shown.text
    shown = tt(server, "policy", "list")
    assert shown.code == 0, shown.text
    shown = tt(server, "audit", "head")
    assert shown.code == 0 and re.match(r"\d+ [0-9a-f]{64}", shown.text.strip()), shown.text
    shown = tt(server, "audit", "verify")
    assert shown.code == 0, shown.text
    shown = tt(server, "audit", "list")
    assert shown.code == 0, shown.text


def test_secrets_and_certs(server: Server, tmp_path: Path) -> None:
    assert tt(server, "secrets", "init").code == 0
    # Type only once the prompt shows: the hidden prompt flushes what was typed before it.
    shown = tt(
        server,
        "secrets",
        "set",
        "--tenant",
        "acme",
        "pw",
        typed=(b"hunter22\r", b"hunter22\r"),
        after=b"value of pw",
    )
    assert shown.code == 0, shown.text
    shown = tt(server, "secrets", "list", "--tenant", "acme")
    assert shown.code == 0 and "pw" in shown.text and "hunter22" not in shown.text
    shown = tt(server, "certs", "init", "--dir", "pki", "--agent", "node-1", cwd=tmp_path)
    assert shown.code == 0, shown.text
    assert (tmp_path / "pki" / "ca.pem").is_file()
    shown = tt(server, "certs", "issue", "--dir", "missing", "--agent", "n", cwd=tmp_path)
    assert shown.code != 0 and "error" in shown.text.lower()


def test_serve_and_agent_usage(server: Server, tmp_path: Path) -> None:
    shown = tt(server, "serve", "--help")
    assert shown.code == 0 and "--tcp" in shown.text
    shown = tt(server, "agent")
    assert shown.code == 2 and "--join" in shown.text


def test_serve_on_a_terminal_stops_on_ctrl_c(server: Server, tmp_path: Path) -> None:
    env = dict(server.env, TARTARUS_RUNTIME_DIR=str(tmp_path / "run"))
    shown = on_terminal(
        "serve",
        "--socket",
        str(tmp_path / "s.sock"),
        env=env,
        typed=(b"\x03",),
        after=b"listening on",
        timeout=60,
    )
    assert "listening on" in shown.text
    assert not shown.traceback, shown.text
    assert shown.code in (0, 130), shown.text


def test_the_lazy_consoles_work_as_rich_consoles() -> None:
    """rich's Live (under Progress and Status) enters its console on every refresh:
    each special method of Console must reach the real one, which `__getattr__` alone
    does not do (Python looks them up on the type)."""
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415

    from tartarus.cli import output  # noqa: PLC0415

    special = {
        name
        for name, value in vars(Console).items()
        if name.startswith("__") and name.endswith("__") and callable(value)
    }
    missing = special - {"__init__"} - set(vars(type(output.err_console)))
    assert not missing, f"the lazy console does not forward {sorted(missing)}"
    with Progress(console=output.err_console, transient=True) as bars:
        bars.add_task("x", total=1)
    with output.err_console.status("working"):
        pass
    with output.console as entered:
        assert isinstance(entered, Console)
