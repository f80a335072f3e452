"""Templates end to end: built-in definitions, Debian builds (base, python), agent
injection, the ext4 image, caching, registered templates with files and scripts, and
what an interrupted or concurrent build leaves behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from tartarus.binaries import find_binary
from tartarus.images import AGENT_PATH, INIT_PATH
from tartarus.images.errors import BuildError, TemplateDefinitionError, TemplateNotFoundError
from tartarus.images.progress import Progress
from tartarus.images.rootfs import ETC_HOSTS, ensure_etc_hosts
from tartarus.images.template import builtin_templates, load_template
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient
from tartarus.runtime.agent_sandbox import AgentExecution, exec_message
from tartarus.runtime.types import ExecRequest
from tests.conftest import require_binary, require_root
from tests.support.images import (
    gvisor_bundle,
    run_in_gvisor,
    runsc_argv,
    runsc_delete,
    shared_store,
    tmp_store,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_builtin_templates_load() -> None:
    builtins = builtin_templates()
    assert {"base", "python", "python-ds", "node"} <= set(builtins)
    for tid, loaded in builtins.items():
        assert loaded.template.id == tid
        assert loaded.builtin


def write_template(directory: Path, name: str, body: str) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


BUSYBOX_BASE = """\
base: {kind: debian, variant: none}
packages: [busybox-static]
shell: [/bin/busybox, sh, -c]
"""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("id: Bad\n" + BUSYBOX_BASE, "id"),
        ("id: x\n" + BUSYBOX_BASE + "files: [{src: a, dest: relative}]\n", "absolute"),
        ("id: x\n" + BUSYBOX_BASE + "files: [{src: a, dest: /.tartarus/x}]\n", "reserved"),
        ("id: x\n" + BUSYBOX_BASE + "unknown_field: 1\n", "unknown_field"),
        ("id: x\nbase: {kind: nosuch}\n", "kind"),
        (
            "id: x\n" + BUSYBOX_BASE + "resources: {memory_mib: 4096}\n"
            "max_resources: {memory_mib: 1024}\n",
            "exceeds",
        ),
    ],
)
def test_bad_definitions_name_the_problem(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(body)
    with pytest.raises(TemplateDefinitionError, match=message) as e:
        load_template(path)
    assert str(path) in str(e.value)


def test_etc_hosts_is_written_only_where_the_image_has_none(tmp_path: Path) -> None:
    bare, own, linked, no_etc = (tmp_path / n for n in ("bare", "own", "linked", "no-etc"))
    for root in (bare, own, linked):
        (root / "etc").mkdir(parents=True)
    (own / "etc/hosts").write_text("10.0.0.1 mine\n")
    (linked / "etc/hosts").symlink_to("/run/hosts")  # the image's own, dangling here
    no_etc.mkdir()
    for root in (bare, own, linked, no_etc):
        ensure_etc_hosts(root)
    assert (bare / "etc/hosts").read_text() == ETC_HOSTS
    assert "127.0.0.1\tlocalhost\n" in ETC_HOSTS and "127.0.1.1\ttartarus\n" in ETC_HOSTS
    assert (own / "etc/hosts").read_text() == "10.0.0.1 mine\n"
    assert (linked / "etc/hosts").readlink() == Path("/run/hosts")
    assert not (no_etc / "etc").exists()


async def test_unknown_template_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(TemplateNotFoundError, match="python"):
        await tmp_store(tmp_path).resolve("nope")


def assert_agent_layout(rootfs: Path) -> None:
    agent = rootfs / AGENT_PATH.lstrip("/")
    assert agent.is_file() and os.access(agent, os.X_OK)
    assert sha256_file(agent) == sha256_file(find_binary("tartarus-agent"))
    run_dir = rootfs / ".tartarus" / "run"
    assert run_dir.is_dir() and not any(run_dir.iterdir())


def ext4_init_target(image: Path) -> str:
    out = subprocess.run(
        ["debugfs", "-R", f"stat {INIT_PATH}", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Fast link dest:"):
            return line.split('"')[1]
    raise AssertionError(out)


@pytest.mark.timeout(600)
async def test_base_template_builds_and_runs(tmp_path: Path) -> None:
    require_root()
    events: list[Progress] = []
    store = shared_store()
    t = await store.resolve("base", progress=events.append)
    assert t.id == "base"
    assert_agent_layout(t.rootfs)
    assert (t.rootfs / "bin" / "sh").exists()
    assert t.ext4 is not None
    assert ext4_init_target(t.ext4) == AGENT_PATH
    fsck = await anyio.run_process(["e2fsck", "-fn", str(t.ext4)], check=False)
    assert fsck.returncode == 0, fsck.stdout
    assert t.manifest.size_bytes < 16 << 20  # tiny: busybox and the agent
    result = run_in_gvisor(t.rootfs, ["/bin/sh", "-c", "echo hello from $(uname -s)"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from Linux\n"
    # Unchanged inputs: the same outputs, straight from the cache.
    again = await store.resolve("base")
    assert (again.rootfs, again.ext4) == (t.rootfs, t.ext4)
    assert again.manifest.key == t.manifest.key


@pytest.mark.timeout(900)
async def test_python_template_runs_python_in_gvisor(tmp_path: Path) -> None:
    """Acceptance: from the built `python` template, gVisor runs python3."""
    require_root()
    require_binary("debootstrap")
    t = await shared_store().resolve("python")
    assert_agent_layout(t.rootfs)
    assert t.ext4 is not None and ext4_init_target(t.ext4) == AGENT_PATH
    result = run_in_gvisor(
        t.rootfs, ["python3", "-c", "import sys; print(sys.version)"], tmp_path, t.manifest.env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3.11."), result.stdout
    # The build host's identity does not leak into the image.
    assert (t.rootfs / "etc/resolv.conf").read_text() == ""
    assert (t.rootfs / "etc/hostname").read_text() == "tartarus\n"
    # Debian's debootstrap writes no /etc/hosts: the rootfs stage does, or localhost
    # would not resolve in a sandbox.
    assert "127.0.0.1\tlocalhost" in (t.rootfs / "etc/hosts").read_text()
    assert not any((t.rootfs / "var/lib/apt/lists").glob("*_Packages"))


@pytest.mark.timeout(900)
async def test_python_runs_through_the_injected_agent_in_gvisor(tmp_path: Path) -> None:
    """The template's own agent, serving over stdio as gVisor's PID 1 on the `python`
    rootfs, runs python3: the path every gVisor sandbox takes."""
    require_root()
    require_binary("debootstrap")
    t = await shared_store().resolve("python", ext4=False)
    bundle = gvisor_bundle(
        t.rootfs, [AGENT_PATH, "serve", "--listen", "stdio"], tmp_path, t.manifest.env
    )
    container = f"erebus-{uuid.uuid4().hex[:12]}"
    try:
        with anyio.fail_after(120):
            async with await AgentClient.spawn(runsc_argv(bundle, container)) as client:
                request = ExecRequest(argv=["python3", "-c", "import sys; print(sys.version)"])
                stream = await client.start(exec_message(request))
                started = await stream.reply()
                assert isinstance(started, p.Started)
                result = await AgentExecution(client, stream, started.pid, started.pty).wait()
        assert result.exit.code == 0, result.stderr
        assert result.stdout.startswith(b"3.11."), result.stdout
    finally:
        await anyio.to_thread.run_sync(runsc_delete, bundle, container)


@pytest.mark.timeout(600)
async def test_registered_template_with_files_script_and_env(tmp_path: Path) -> None:
    require_root()
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.sh").write_text("echo app says $GREETING\n")
    (tmp_path / "motd").write_text("welcome\n")
    path = write_template(
        tmp_path,
        "demo",
        """\
        id: demo
        description: a test template
        base: {kind: debian, variant: none}
        packages: [busybox-static]
        shell: [/bin/busybox, sh, -c]
        files:
          - {src: app, dest: /opt/app, mode: 0755}
          - {src: motd, dest: /etc/motd}
        env: {GREETING: hi}
        build: |
          /bin/busybox --install -s /bin
          echo "built with $GREETING" > /built
        warmup: /opt/app/main.sh
        timeout_s: 42
        backends: [gvisor]
        """,
    )
    store = tmp_store(tmp_path / "store")
    t = await store.build(path, ext4=False)
    assert t.ext4 is None
    assert (t.rootfs / "built").read_text() == "built with hi\n"
    assert (t.rootfs / "etc/motd").read_text() == "welcome\n"
    assert (t.rootfs / "opt/app/main.sh").stat().st_mode & 0o777 == 0o755
    assert t.manifest.env["GREETING"] == "hi"
    assert t.manifest.timeout_s == 42
    infos = {i.id: i for i in await store.list()}
    assert infos["demo"].built and not infos["demo"].builtin
    assert not infos["python"].built
    # Changing a copied file changes the build.
    (tmp_path / "motd").write_text("changed\n")
    t2 = await store.resolve("demo", ext4=False)
    assert t2.manifest.key != t.manifest.key
    assert (t2.rootfs / "etc/motd").read_text() == "changed\n"


@pytest.mark.timeout(300)
async def test_failing_build_script_reports_its_output(tmp_path: Path) -> None:
    require_root()
    path = write_template(
        tmp_path,
        "broken",
        "id: broken\n" + BUSYBOX_BASE + "build: echo about to fail; exit 3\n",
    )
    store = tmp_store(tmp_path / "store")
    with pytest.raises(BuildError, match=r"(?s)status 3.*about to fail"):
        await store.build(path)
    assert list((tmp_path / "store/state/images/trees/sha256").iterdir()) == []


SLOW = (
    "id: slow\n"
    + BUSYBOX_BASE
    + "build: /bin/busybox date +%s%N > /stamp; /bin/busybox sleep {sleep}\n"
)


def _resolve_in_subprocess(store_root: Path, template: Path) -> subprocess.Popen[str]:
    code = textwrap.dedent(
        f"""
        import anyio, sys
        from pathlib import Path
        from tests.support.images import tmp_store
        async def main():
            t = await tmp_store(Path({str(store_root)!r})).build(Path({str(template)!r}),
                progress=lambda p: print(p.step, flush=True))
            print("ROOTFS", t.rootfs, flush=True)
        anyio.run(main)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )


@pytest.mark.timeout(600)
def test_interrupted_build_leaves_nothing_visible(tmp_path: Path) -> None:
    require_root()
    template = write_template(tmp_path, "slow", SLOW.replace("{sleep}", "60"))
    proc = _resolve_in_subprocess(tmp_path / "store", template)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == "build":
            break
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    state = tmp_path / "store/state/images"
    assert list((state / "trees/sha256").iterdir()) == []
    assert not list((state / "builds").glob("*.json"))
    leftovers = list((state / "tmp").iterdir())
    assert leftovers  # the killed build's staging directory...
    store = tmp_store(tmp_path / "store")
    anyio.run(store.gc)
    assert list((state / "tmp").iterdir()) == []  # ...is swept once its process is gone
    # Nothing mounted or running is left from the build.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts


@pytest.mark.timeout(600)
def test_concurrent_builds_of_the_same_inputs_build_once(tmp_path: Path) -> None:
    require_root()
    template = write_template(tmp_path, "slow", SLOW.replace("{sleep}", "2"))
    procs = [_resolve_in_subprocess(tmp_path / "store", template) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rootfs = {line.split()[1] for out in outputs for line in out.splitlines() if "ROOTFS" in line}
    # A second build would have written another timestamp, hence another digest.
    assert len(rootfs) == 1, outputs
