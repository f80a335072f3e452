"""The wheel installs and runs on a distribution other than the one that built it.

A Debian 13 (trixie) root with only python3, python3-venv and what the jail's `base`
template build takes from the host (gpgv and the archive keyring to verify Debian's
archive, bubblewrap for the template's build script): no checkout, no Rust toolchain,
no compiler. Inside it: a fresh virtualenv, `pip install` of the wheel from dist/
(dependencies from PyPI, their wheels kept between runs), `tartarus doctor --json`,
and a jail sandbox that runs echo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tartarus.host.doctor import DoctorReport
from tests.conftest import REPO_ROOT, require_binary, require_root
from tests.support.debian_root import KEYRING, cache_root, chroot_argv, ensure_root

SUITE = "trixie"
# python3-venv: `python3 -m venv`. gpgv and debian-archive-keyring: the `base` template
# verifies Debian's InRelease with gpgv. bubblewrap: template build scripts run in it.
PACKAGES = ("python3", "python3-venv", "gpgv", "debian-archive-keyring", "bubblewrap")
TRIXIE_KEY = Path("/usr/share/keyrings/debian-archive-trixie-stable.gpg")


def _wheel() -> Path:
    wheels = sorted((REPO_ROOT / "dist").glob("tartarus-*.whl"))
    if not wheels:
        pytest.fail("no wheel in dist/: `make install` builds it")
    return wheels[-1]


@pytest.fixture
def say(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[str], None]]:
    def emit(message: str) -> None:
        with capsys.disabled():
            print(f"\n[{SUITE} root] {message}", flush=True)

    yield emit


def _run(
    root: Path, argv: list[str], binds: dict[str, Path], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        chroot_argv(root, argv, binds=binds, env=env, cwd="/mnt/scratch"),
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"in the {SUITE} root, {' '.join(argv)} exited with {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


@pytest.mark.timeout(1800)
def test_wheel_installs_and_runs_a_jail_sandbox_in_debian_trixie(
    tmp_path: Path, doctor_report: DoctorReport, say: Callable[[str], None]
) -> None:
    require_root()
    require_binary("debootstrap")
    require_binary("unshare")
    wheel = _wheel()
    if not KEYRING.is_file() or not TRIXIE_KEY.is_file():
        pytest.fail(
            f"{TRIXIE_KEY} is missing: Debian 12's debian-archive-keyring carries the trixie "
            "keys from 2023.3+deb12u2 on (apt-get install --only-upgrade debian-archive-keyring)"
        )
    root = ensure_root(SUITE, PACKAGES, say)
    # What the root lacks, found by looking rather than assumed: the doctor must agree.
    assert not any((root / d / "runsc").exists() for d in ("usr/bin", "usr/sbin", "bin"))
    assert not (root / "usr/bin/cargo").exists() and not (root / "usr/bin/cc").exists()

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # Dependencies' wheels, kept between runs: `pip download` skips the files it finds
    # there (pip's HTTP cache does not help where responses carry no cache headers).
    wheelhouse = cache_root() / f"{SUITE}-wheelhouse"
    template_cache = cache_root() / f"{SUITE}-tartarus-cache"
    for d in (wheelhouse, template_cache):
        d.mkdir(parents=True, exist_ok=True)
    binds = {
        "/mnt/scratch": scratch,
        "/mnt/dist": wheel.parent,
        "/mnt/wheelhouse": wheelhouse,
        "/mnt/tartarus-cache": template_cache,
    }
    env = {
        "HOME": "/mnt/scratch/home",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "TARTARUS_CACHE_DIR": "/mnt/tartarus-cache",
        "TARTARUS_STATE_DIR": "/mnt/scratch/state",
        "TARTARUS_RUNTIME_DIR": "/mnt/scratch/run",
    }
    # pip in the root trusts what pip on the host trusts (a host whose egress goes through
    # a TLS proxy lists the proxy's CA in that bundle).
    host_ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if host_ca and Path(host_ca).is_file():
        shutil.copyfile(host_ca, scratch / "host-ca.pem")
        env["PIP_CERT"] = "/mnt/scratch/host-ca.pem"
    venv = "/mnt/scratch/venv"
    timings: dict[str, float] = {}

    def step(name: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        proc = _run(root, argv, binds, env, timeout)
        timings[name] = round(time.monotonic() - start, 1)
        return proc

    version = step("python", ["python3", "--version"], 60).stdout.split()
    assert version[0] == "Python" and tuple(map(int, version[1].split(".")[:2])) >= (3, 11)
    step("venv", ["python3", "-m", "venv", venv], 120)
    pip = f"{venv}/bin/pip"
    step(
        "pip download",
        [pip, "download", "-q", "-d", "/mnt/wheelhouse", f"/mnt/dist/{wheel.name}"],
        900,
    )
    for stale in wheelhouse.glob("tartarus-*"):
        stale.unlink()
    # --no-compile: byte-compiling scipy and friends is most of an install's time.
    offline = ["--no-compile", "--no-index", "--find-links", "/mnt/wheelhouse"]
    step("pip install", [pip, "install", "-q", *offline, f"/mnt/dist/{wheel.name}"], 600)

    doctor = step("doctor", [f"{venv}/bin/tartarus", "doctor", "--json"], 180)
    report: dict[str, Any] = json.loads(doctor.stdout)
    backends = {b["name"]: b for b in report["backends"]}
    tools = {t["name"]: t for t in report["tools"]}
    assert set(backends) == {"microvm", "gvisor", "jail", "wasm"}
    # runsc is not in the root: the doctor says so, and gVisor is not offered.
    assert tools["runsc"]["available"] is False, tools["runsc"]
    assert backends["gvisor"]["available"] is False
    assert "runsc" in backends["gvisor"]["reason"]
    # wasmtime came from PyPI with the wheel's dependencies.
    assert tools["wasmtime"]["available"] is True, tools["wasmtime"]
    # Same kernel as the host: the kernel-bound verdicts match the host's own doctor.
    for name in ("microvm", "jail"):
        assert backends[name]["available"] == doctor_report.backend(name).available, (
            name,
            backends[name],
            doctor_report.backend(name),
        )
    if not backends["jail"]["available"]:
        pytest.fail(f"the jail backend is unavailable here: {backends['jail']['reason']}")

    run = step(
        "jail echo",
        [f"{venv}/bin/tartarus", "run", "-b", "jail", "--trusted", "--", "echo", "hello"],
        900,
    )
    assert run.stdout == "hello\n", run
    say(f"steps (s): {timings}")
    shutil.rmtree(scratch, ignore_errors=True)
