"""Which runsc the gvisor backend runs, the pinned build of it, and a coreutils userland
inside it (`ls /` failed with Debian 12's runsc: it rejects statx with AT_NO_AUTOMOUNT)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tartarus.config import Settings
from tartarus.host import runsc as runsc_mod
from tartarus.host.doctor import DoctorReport
from tartarus.host.tools import check_runsc
from tartarus.runtime.types import Backend
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox
from tests.support.snapshots import isolated_settings, serving

TARTARUS = str(Path(sys.executable).parent / "tartarus")
CACHE = Settings().cache_dir


def _path_runsc() -> str:
    found = shutil.which("runsc")
    if found is None:
        pytest.skip("no runsc on PATH (apt-get install runsc)")
    return found


def _pinned() -> Path:
    pinned = runsc_mod.pinned_path(CACHE)
    if not pinned.is_file():
        pytest.fail(f"{pinned} is missing: `make artefacts` (tartarus runsc install) builds it")
    return pinned


def _executable(path: Path, target: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def test_lookup_order_setting_then_pinned_then_path(tmp_path: Path) -> None:
    on_path = _path_runsc()
    cache = tmp_path / "cache"
    assert runsc_mod.locate_runsc(None, cache) == (on_path, runsc_mod.RunscSource.PATH)
    pinned = _executable(runsc_mod.pinned_path(cache), on_path)
    assert runsc_mod.locate_runsc(None, cache) == (str(pinned), runsc_mod.RunscSource.PINNED)
    explicit = _executable(tmp_path / "elsewhere" / "runsc", on_path)
    assert runsc_mod.locate_runsc(explicit, cache) == (
        str(explicit),
        runsc_mod.RunscSource.SETTING,
    )


def test_setting_comes_from_the_environment(tmp_path: Path) -> None:
    on_path = _path_runsc()
    explicit = _executable(tmp_path / "x" / "runsc", on_path)
    env = {**os.environ, "TARTARUS_RUNSC": str(explicit), "TARTARUS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [TARTARUS, "runsc", "which", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    report = json.loads(proc.stdout)
    assert report["runsc"]["path"] == str(explicit)
    assert report["runsc"]["source"] == "setting"


def test_debian_2022_runsc_is_named_degraded(tmp_path: Path) -> None:
    """With an empty cache the doctor falls back to PATH; Debian's 2022 build is degraded."""
    on_path = _path_runsc()
    version = runsc_mod.runsc_version(on_path)
    check = check_runsc(None, tmp_path / "empty-cache")
    assert check.path == on_path
    assert check.source == "PATH"
    if not version.startswith("0.0~2022"):
        pytest.skip(f"runsc on PATH is {version}, not Debian 12's 2022 build")
    assert check.degraded
    assert "statx" in check.detail
    assert "DEGRADED" in check.detail


def _systrap_runs(runsc: str, tmp: Path) -> bool:
    """`runsc --platform=systrap do true` by hand, sharing no project code."""
    flags = ["--root", str(tmp / "state"), "--platform=systrap", "--network=none"]
    if os.geteuid() != 0:
        flags += ["--rootless", "--ignore-cgroups"]
    proc = subprocess.run(
        [runsc, *flags, "do", "true"], capture_output=True, timeout=60, check=False, cwd=tmp
    )
    return proc.returncode == 0


def test_doctor_names_the_runsc_and_platform_in_use(doctor_report: DoctorReport) -> None:
    tool = doctor_report.tool("runsc")
    assert tool.path is not None
    assert tool.source in {s.value for s in runsc_mod.RunscSource}
    if tool.source == "pinned build":
        assert tool.version == runsc_mod.RUNSC_VERSION
        assert not tool.degraded
    with tempfile.TemporaryDirectory() as tmp:
        systrap = _systrap_runs(tool.path, Path(tmp))
    assert tool.platform == ("systrap" if systrap else "ptrace")
    assert tool.platform_reason
    if tool.available:
        assert f"--platform={tool.platform}" in doctor_report.backend("gvisor").reason


def _has_interpreter(binary: Path) -> bool:
    """Whether an ELF64 file asks for a dynamic loader (a PT_INTERP program header)."""
    with binary.open("rb") as f:
        header = f.read(64)
        assert header[:4] == b"\x7fELF" and header[4] == 2
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == pt_interp for i in range(phnum))


def test_install_is_a_cache_hit_of_a_static_stamped_build() -> None:
    pinned = _pinned()
    proc = subprocess.run(
        [TARTARUS, "runsc", "install", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "TARTARUS_CACHE_DIR": str(CACHE)},
        timeout=120,
        check=True,
    )
    result = json.loads(proc.stdout)
    assert result == {
        "path": str(pinned),
        "version": runsc_mod.RUNSC_VERSION,
        "cached": True,
        "seconds": result["seconds"],
        "go": "",  # nothing was built
    }
    assert result["seconds"] < 1.0
    assert runsc_mod.runsc_version(str(pinned)) == runsc_mod.RUNSC_VERSION
    assert not _has_interpreter(pinned), "runsc must be static (CGO_ENABLED=0)"


def test_go_versions_parse() -> None:
    assert runsc_mod.parse_go_version("go1.19.8") == (1, 19, 8)
    assert runsc_mod.parse_go_version("go version go1.26.8 linux/amd64") == (1, 26, 8)
    assert runsc_mod.parse_go_version("go1.22rc1") == (1, 22, 0)
    with pytest.raises(runsc_mod.RunscError, match="not a Go version"):
        runsc_mod.parse_go_version("devel")


def test_a_go_new_enough_for_gvisor_builds_it_as_is(tmp_path: Path) -> None:
    go = runsc_mod.find_go()
    version = runsc_mod.go_version(go, tmp_path)
    if runsc_mod.parse_go_version(version) < runsc_mod.RUNSC_GO_MIN:
        pytest.skip(f"the go on PATH is {version}, older than gVisor needs")
    assert runsc_mod.toolchain_for_runsc(go, tmp_path) == (go, version)
    assert runsc_mod.toolchain_for_runsc(None, tmp_path) == (go, version)
    assert not (tmp_path / "mod").exists()  # nothing fetched


def _old_go() -> Path:
    """Debian 12's Go (golang-go, 1.19: it predates GOTOOLCHAIN), or any Go under
    /usr/lib older than gVisor needs."""
    for go in sorted(Path("/usr/lib").glob("go-1.*/bin/go")):
        version = runsc_mod.go_version(go, Path(tempfile.gettempdir()))
        if runsc_mod.parse_go_version(version) < runsc_mod.RUNSC_GO_MIN:
            return go
    pytest.skip("no Go older than gVisor needs under /usr/lib (apt-get install golang-go)")


def test_an_old_go_first_on_path_does_not_hide_a_newer_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _old_go()
    newer = Path("/usr/local/go/bin/go")
    if not newer.is_file():
        pytest.skip("no Go in /usr/local/go")
    version = runsc_mod.go_version(newer, tmp_path)
    if runsc_mod.parse_go_version(version) < runsc_mod.RUNSC_GO_MIN:
        pytest.skip(f"/usr/local/go is {version}, older than gVisor needs")
    monkeypatch.setenv("PATH", f"{old.parent}:{os.environ['PATH']}")
    assert runsc_mod.go_candidates()[:2] == [old, newer]
    assert runsc_mod.toolchain_for_runsc(None, tmp_path) == (newer, version)
    assert not (tmp_path / "mod").exists()


@pytest.mark.timeout(600)
def test_an_old_go_fetches_the_pinned_toolchain_which_compiles(tmp_path: Path) -> None:
    """Debian 12's Go 1.19 cannot build the pinned gVisor: it fetches GO_TOOLCHAIN from
    the Go module proxy into the runsc build's module cache (where `tartarus runsc
    install` would: once per machine), and that toolchain compiles a static program."""
    old = _old_go()
    events: list[runsc_mod.BuildEvent] = []
    go_root = CACHE / "runsc" / "go"
    go, version = runsc_mod.toolchain_for_runsc(old, go_root, events.append)
    assert version == runsc_mod.GO_TOOLCHAIN
    assert go.is_relative_to(go_root / "mod" / "golang.org")
    assert go.parent.parent.name.startswith(f"toolchain@v0.0.1-{runsc_mod.GO_TOOLCHAIN}.")
    assert [e.phase for e in events] == ["toolchain", "toolchain"]
    (tmp_path / "main.go").write_text('package main\n\nfunc main() { println("built") }\n')
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOCACHE": str(tmp_path / "cache"),
           "CGO_ENABLED": "0", "GO111MODULE": "off"}  # fmt: skip
    env.pop("GOROOT", None)
    proc = subprocess.run([str(go), "run", "main.go"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr.strip()) == (0, "built"), proc.stderr


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(tmp_path: Path, doctor_report: DoctorReport) -> AsyncIterator[Client]:
    verdict = doctor_report.backend("gvisor")
    if not verdict.available:
        pytest.skip(f"gvisor unavailable here: {verdict.reason}")
    async with serving(isolated_settings(tmp_path)) as c:
        yield c


async def mountinfo() -> list[str]:
    return (await anyio.Path("/proc/self/mountinfo").read_text()).splitlines()


@pytest.mark.anyio
@pytest.mark.timeout(300)
async def test_coreutils_ls_and_stat_work_in_a_python_sandbox(
    client: Client, doctor_report: DoctorReport, tmp_path: Path
) -> None:
    if doctor_report.tool("runsc").degraded:
        pytest.fail(
            f"runsc in use is {doctor_report.tool('runsc').version} (degraded: "
            "`ls /` fails there); `make artefacts` builds the pinned one"
        )
    sb = await Sandbox.create("python", backend=Backend.GVISOR, client=client, timeout=300)
    try:
        for command, expect in (
            ("ls -la /", "tmp"),
            ("stat /", "Inode"),
            ("touch /tmp/seen && ls /tmp", "seen"),
        ):
            result = await sb.commands.run(command)
            assert result.exit_code == 0, f"{command}: {result.stderr}"
            assert expect in result.stdout, f"{command}: {result.stdout}"
    finally:
        await sb.kill()
    # The last sandbox gone, runsc's pinned empty netns is unmounted from the state dir
    # (by its teardown, which goes on after the DELETE answered).
    with anyio.fail_after(30):
        while [m for m in await mountinfo() if str(tmp_path) in m and "null-netns" in m]:  # noqa: ASYNC110 - /proc has no event
            await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_agent_binary_reaches_the_sandbox_from_another_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent is hard-linked into each sandbox's agent directory; when the installed
    binary is on another filesystem (EXDEV), through one copy per installed binary,
    which a reap leaves alone and an upgrade replaces."""
    from tartarus.binaries import find_binary  # noqa: PLC0415
    from tartarus.runtime.gvisor import AGENT_COPIES, GvisorRuntime  # noqa: PLC0415

    installed = find_binary("tartarus-agent")
    real_link = os.link

    def no_link_across(src: object, dst: object) -> None:
        if Path(str(src)) == installed:
            raise OSError(18, "Invalid cross-device link")
        real_link(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", no_link_across)
    runtime = GvisorRuntime(tmp_path / "state")
    (tmp_path / "state" / "gvisor").mkdir(parents=True)
    for name in ("a", "b"):
        runtime._link_agent(tmp_path / name)
        assert (tmp_path / name).read_bytes() == installed.read_bytes()
    copies = list((tmp_path / "state" / "gvisor" / AGENT_COPIES).iterdir())
    assert len(copies) == 1 and copies[0].stat().st_nlink == 3
    assert await runtime.reap(set()) == []
    assert copies[0].exists()
