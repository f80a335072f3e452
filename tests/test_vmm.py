"""The microVM monitor (`tartarus-vmm`) running the probe guest on this host's KVM.

Every test boots real guest code: the probe guest (rust/vmm/guests/probe.S) picks a
program from its command line and reports over the serial port. Linux guests need a
host whose KVM delivers exceptions; those tests carry the `kvm_full` marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from tartarus.config import Settings, load_settings
from tartarus.host.doctor import DoctorReport
from tartarus.runtime.base import BackendUnavailableError
from tartarus.runtime.microvm import MicroVmRuntime
from tartarus.runtime.types import SandboxSpec
from tartarus.runtime.vmm_api import MachineConfig, VmmError, VmmProcess, VmState
from tests.support.hugepages import free_huge_pages, meminfo
from tests.support.probe_guests import (
    build_probe_bzimage,
    build_probe_guest,
    seccomp_selftest,
    vmm_binary,
    xorshift_result,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_probe_guest()


@pytest.fixture(scope="module")
def vmm_bin(doctor_report: DoctorReport) -> str:
    return vmm_binary(doctor_report)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def machine(guest: Path, tmp_path: Path, program: str, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "memory_mib": 64,
        "kernel": str(guest),
        "cmdline": program,
        "boot_protocol": "linux64",
        "serial": {"kind": "file", "path": str(tmp_path / "serial.log")},
        "wall_clock_limit_ms": 60_000,
    }
    config.update(overrides)
    return config


class Run(msgspec.Struct):
    returncode: int
    exit: dict[str, Any] | None
    metrics: dict[str, Any]
    serial: str
    stderr: str


def run_vmm(vmm_bin: str, tmp_path: Path, config: dict[str, Any], *extra: str) -> Run:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    proc = subprocess.run(
        [vmm_bin, "run", "--config", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert "panicked" not in proc.stderr
    out = json.loads(proc.stdout) if proc.stdout.strip() else {"exit": None, "metrics": {}}
    serial_log = tmp_path / "serial.log"
    serial = serial_log.read_text() if serial_log.exists() else ""
    return Run(proc.returncode, out["exit"], out["metrics"], serial, proc.stderr)


def run_probe(vmm_bin: str, guest: Path, tmp_path: Path, program: str, **kw: Any) -> Run:
    return run_vmm(vmm_bin, tmp_path, machine(guest, tmp_path, program, **kw))


# ---- probe programs ---------------------------------------------------------------


def test_hello_prints_on_serial_and_resets(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "hello")
    assert r.serial == "hello from the probe guest\n"
    assert r.exit == {"reason": "reset"}
    assert r.returncode == 0
    assert r.metrics["serial_bytes"] == len(r.serial)
    assert r.metrics["first_exit_us"] >= r.metrics["start_us"] > 0


@pytest.mark.parametrize("memory_mib", [8, 96])
def test_guest_writes_and_reads_back_all_of_its_ram(
    vmm_bin: str, guest: Path, tmp_path: Path, memory_mib: int
) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "mem", memory_mib=memory_mib)
    top = memory_mib << 20
    pages = (top - (2 << 20)) // 4096
    assert r.serial == f"mem: pages={pages:016x} errors={0:016x} top={top:016x}\n"
    assert r.exit == {"reason": "reset"}


def test_long_computation_result_is_exact(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    rounds = 60_000
    r = run_probe(vmm_bin, guest, tmp_path, f"compute {rounds}")
    assert r.serial.endswith(f"compute={xorshift_result(rounds):016x}\n")
    # A dot each time the count of remaining rounds reaches a multiple of 16384.
    assert r.serial.count(".") == -(-rounds // 16384)


def test_unclaimed_ports_and_mmio_read_as_empty_bus(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "ports")
    assert r.serial.startswith("O")  # a 32-bit OUT to the UART sends its low byte
    assert f"ports in={0xFF:016x} mmio={0xFFFFFFFF:016x} top={2**64 - 1:016x}" in r.serial
    m = r.metrics
    assert (m["unclaimed_pio_writes"], m["unclaimed_pio_reads"]) == (4, 1)
    assert (m["unclaimed_mmio_writes"], m["unclaimed_mmio_reads"]) == (1, 2)
    assert r.exit == {"reason": "reset"}


def test_guest_exception_is_reported_never_a_hang(
    vmm_bin: str, guest: Path, tmp_path: Path, doctor_report: DoctorReport
) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "int3")
    assert r.serial.startswith("int3\n")
    assert r.exit is not None
    if doctor_report.kernel.kvm.full_guests:
        # The boot IDT is empty: the exception escalates to a triple fault.
        # Reported where it happened, by the vCPU thread under its seccomp filter.
        assert r.exit["reason"] == "shutdown"
        assert r.exit["detail"].startswith("vcpu 0 triple fault at rip 0x"), r.exit
        assert r.returncode != -signal.SIGSYS
    else:
        assert r.exit["reason"] == "internal_error"
        assert r.exit["suberror"] == 1
        assert isinstance(r.exit["data"], list)
        assert r.exit["rip"] > 0x100000
    assert "survived" not in r.serial


def test_spinning_guest_is_stopped_by_the_wall_clock_limit(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "spin", wall_clock_limit_ms=300)
    assert r.serial == "spin\n"
    assert r.exit == {"reason": "wall_clock_limit", "limit_ms": 300}
    assert r.returncode == 1


def test_two_vcpus_boot(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    r = run_probe(vmm_bin, guest, tmp_path, "hello", vcpus=2)
    assert r.exit == {"reason": "reset"}


@pytest.mark.parametrize("program", ["hello", "mem", "compute 20000", "ports"])
def test_pvh_entry_runs_the_same_programs(
    vmm_bin: str, guest: Path, tmp_path: Path, program: str
) -> None:
    # The 32-bit entry with flat 4 GiB segments; the guest finds RAM in the PVH memmap.
    for sub in ("pvh", "linux64"):
        (tmp_path / sub).mkdir()
    pvh = run_probe(vmm_bin, guest, tmp_path / "pvh", program, boot_protocol="pvh")
    linux = run_probe(vmm_bin, guest, tmp_path / "linux64", program)
    assert pvh.exit == linux.exit == {"reason": "reset"}
    assert pvh.serial == linux.serial
    assert "errors=0000000000000000" in pvh.serial or program != "mem"


@pytest.mark.kvm_full
def test_linux_guest_boots_to_its_console(vmm_bin: str, guest_kernel: Path, tmp_path: Path) -> None:
    config = {
        "memory_mib": 256,
        "kernel": str(guest_kernel),
        "cmdline": "console=ttyS0 reboot=k panic=-1 pci=off",
        "serial": {"kind": "file", "path": str(tmp_path / "serial.log")},
        "wall_clock_limit_ms": 30_000,
    }
    r = run_vmm(vmm_bin, tmp_path, config)
    assert "Linux version" in r.serial
    # Without a root filesystem the kernel panics and reboots: a clean reset.
    assert r.exit == {"reason": "reset"}


# ---- hostile input ----------------------------------------------------------------


def _patched_elf(guest: Path, tmp_path: Path, patch: str) -> Path:
    data = bytearray(guest.read_bytes())
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    if patch == "segment_in_mmio_gap":
        struct.pack_into("<Q", data, phoff + 0x18, 0xD000_0000)  # p_paddr
    elif patch == "segment_past_ram":
        struct.pack_into("<Q", data, phoff + 0x18, 0x7FFF_F000)
    elif patch == "entry_below_1mib":
        struct.pack_into("<Q", data, 0x18, 0x1000)
    elif patch == "huge_phnum":
        struct.pack_into("<H", data, 0x38, 0xFFFF)
    elif patch == "bad_phentsize":
        struct.pack_into("<H", data, 0x36, 7)
    elif patch == "segment_size_overflows":
        struct.pack_into("<Q", data, phoff + 0x20, 2**63)  # p_filesz
    path = tmp_path / f"{patch}.elf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "kernel",
    [
        "missing",
        "empty",
        "garbage",
        "truncated_elf",
        "segment_in_mmio_gap",
        "segment_past_ram",
        "entry_below_1mib",
        "huge_phnum",
        "bad_phentsize",
        "segment_size_overflows",
    ],
)
def test_bad_kernel_images_are_errors_not_crashes(
    vmm_bin: str, guest: Path, tmp_path: Path, kernel: str
) -> None:
    path = tmp_path / kernel
    if kernel == "empty":
        path.write_bytes(b"")
    elif kernel == "garbage":
        path.write_bytes(os.urandom(64 << 10))
    elif kernel == "truncated_elf":
        path.write_bytes(guest.read_bytes()[:40])
    elif kernel != "missing":
        path = _patched_elf(guest, tmp_path, kernel)
    r = run_vmm(vmm_bin, tmp_path, machine(guest, tmp_path, "hello", kernel=str(path)))
    assert r.returncode == 3, r.stderr
    assert "kernel" in r.stderr
    assert r.serial == ""


# ---- bzImage -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bzimage() -> Path:
    return build_probe_bzimage()


@pytest.mark.parametrize("program", ["hello", "mem", "compute 20000"])
def test_bzimage_runs_the_same_programs(
    vmm_bin: str, guest: Path, bzimage: Path, tmp_path: Path, program: str
) -> None:
    for sub in ("bz", "elf"):
        (tmp_path / sub).mkdir()
    bz = run_probe(vmm_bin, bzimage, tmp_path / "bz", program, boot_protocol="auto")
    elf = run_probe(vmm_bin, guest, tmp_path / "elf", program)
    assert bz.exit == elf.exit == {"reason": "reset"}, bz.stderr
    assert bz.serial == elf.serial


def _patched_bzimage(bzimage: Path, tmp_path: Path, patch: str) -> Path:
    data = bytearray(bzimage.read_bytes())
    if patch == "no_hdrs_magic":
        data[0x202:0x206] = b"HdrX"
    elif patch == "old_protocol":
        struct.pack_into("<H", data, 0x206, 0x01FF)
    elif patch == "not_loaded_high":
        data[0x211] = 0
    elif patch == "code32_below_1mib":
        struct.pack_into("<I", data, 0x214, 0x1000)
    elif patch == "setup_longer_than_file":
        data[0x1F1] = 0xFF
    elif patch == "payload_past_ram":
        data += bytes(16 << 20)
    elif patch == "truncated_header":
        del data[0x210:]
    path = tmp_path / f"{patch}.bzImage"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "patch",
    [
        "no_hdrs_magic",
        "old_protocol",
        "not_loaded_high",
        "code32_below_1mib",
        "setup_longer_than_file",
        "payload_past_ram",
        "truncated_header",
    ],
)
def test_bad_bzimages_are_errors_not_crashes(
    vmm_bin: str, bzimage: Path, tmp_path: Path, patch: str
) -> None:
    path = _patched_bzimage(bzimage, tmp_path, patch)
    r = run_vmm(vmm_bin, tmp_path, machine(path, tmp_path, "hello", memory_mib=8))
    assert r.returncode == 3, r.stderr
    assert "kernel" in r.stderr
    assert r.serial == ""


def test_a_bzimage_has_no_pvh_entry(vmm_bin: str, bzimage: Path, tmp_path: Path) -> None:
    r = run_probe(vmm_bin, bzimage, tmp_path, "hello", boot_protocol="pvh")
    assert r.returncode == 3
    assert "no PVH entry note" in r.stderr


@pytest.mark.parametrize(
    "override",
    [
        {"memory_mib": 0},
        {"memory_mib": 1 << 40},
        {"vcpus": 0},
        {"vcpus": 33},
        {"cmdline": "x" * 5000},
        {"cmdline": "bad\u0001char"},
        {"wall_clock_limit_ms": 0},
        {"surprise": True},
        {"serial": {"kind": "socket", "path": "/nonexistent/serial.sock"}},
        {"memory": {"file": "/nonexistent/memory"}},
    ],
)
def test_bad_machine_configs_are_rejected(
    vmm_bin: str, guest: Path, tmp_path: Path, override: dict[str, Any]
) -> None:
    r = run_vmm(vmm_bin, tmp_path, machine(guest, tmp_path, "hello", **override))
    assert r.returncode == 3
    assert r.stderr.startswith("tartarus-vmm: ")


def test_file_backed_memory_is_copy_on_write(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    backing = tmp_path / "memory.img"
    backing.write_bytes(b"\xab" * (16 << 20))
    r = run_probe(vmm_bin, guest, tmp_path, "mem", memory_mib=16, memory={"file": str(backing)})
    assert f"errors={0:016x}" in r.serial
    assert backing.read_bytes() == b"\xab" * (16 << 20), "the backing file is never written"


# ---- huge pages ---------------------------------------------------------------------

HUGE_PAGES = 16  # a 32 MiB guest


def _huge_page_mappings(pid: int) -> int:
    """How many of `pid`'s mappings use 2 MiB kernel pages."""
    mappings = Path(f"/proc/{pid}/smaps").read_text().split("\nKernelPageSize:")
    return sum(m.split()[0] == "2048" for m in mappings[1:])


@pytest.fixture
def huge_pages() -> Iterator[int]:
    with free_huge_pages(HUGE_PAGES) as count:
        yield count


@pytest.mark.anyio
async def test_guest_ram_on_huge_pages(
    vmm_bin: str, guest: Path, tmp_path: Path, huge_pages: int
) -> None:
    vmm = await VmmProcess.launch(tmp_path / "vm")
    try:
        cfg = machine(guest, tmp_path, "mem", memory_mib=2 * huge_pages)
        cfg["memory"] = {"hugepages": True}
        await vmm.configure(msgspec.convert(cfg, MachineConfig, dec_hook=_path))
        await vmm.start()
        report = await vmm.wait(60)
        assert report.exit is not None and report.exit.reason == "reset"
        assert f"errors={0:016x}" in (tmp_path / "serial.log").read_text()
        assert _huge_page_mappings(vmm.process.pid) >= 1, "guest RAM is not on 2 MiB pages"
    finally:
        await vmm.stop()


def test_a_short_huge_page_pool_is_a_clear_error(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    short = (meminfo()["HugePages_Free"] + 64) * 2
    r = run_probe(vmm_bin, guest, tmp_path, "hello", memory_mib=short, memory={"hugepages": True})
    assert r.returncode == 3
    assert "huge pages" in r.stderr and "nr_hugepages" in r.stderr
    assert r.serial == ""


# ---- seccomp ----------------------------------------------------------------------


@pytest.mark.parametrize("thread", ["api", "vcpu"])
def test_a_forbidden_system_call_kills_the_vmm(vmm_bin: str, thread: str) -> None:
    assert seccomp_selftest(vmm_bin, thread).returncode == -signal.SIGSYS


def test_probe_guests_run_under_seccomp_and_without(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    config = machine(guest, tmp_path, "ports")
    assert run_vmm(vmm_bin, tmp_path, config).exit == {"reason": "reset"}
    (tmp_path / "serial.log").unlink()
    assert run_vmm(vmm_bin, tmp_path, config, "--no-seccomp").exit == {"reason": "reset"}


# ---- the control API through the Python client -------------------------------------


@pytest.mark.anyio
async def test_api_lifecycle_and_state_errors(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    vmm = await VmmProcess.launch(tmp_path / "vm")
    try:
        assert (await vmm.state()).state is VmState.NOT_CONFIGURED
        with pytest.raises(VmmError) as e:
            await vmm.pause()
        assert e.value.kind == "invalid_state"
        with pytest.raises(VmmError) as e:
            await vmm.start()
        assert e.value.kind == "invalid_state"
        config = msgspec.convert(machine(guest, tmp_path, "hello"), MachineConfig, dec_hook=_path)
        assert (await vmm.configure(config)).state is VmState.CONFIGURED
        await vmm.start()
        report = await vmm.wait(30)
        assert report.state is VmState.EXITED
        assert report.exit is not None and report.exit.reason == "reset"
        assert report.entry == "linux64"
        metrics = await vmm.metrics()
        assert metrics.exits_io_out >= len("hello from the probe guest\n")
        assert metrics.guest_memory_bytes == 64 << 20
        with pytest.raises(VmmError) as e:
            await vmm.start()
        assert e.value.kind == "invalid_state"
        final = await vmm.stop()
        assert final is not None and final.clean
        assert vmm.process.returncode == 0
    finally:
        await vmm.kill()
    assert not vmm.socket.exists()


def _path(type_: type, obj: Any) -> Any:
    return Path(obj) if type_ is Path else obj


async def _wait_for(path: Path, text: str, count: int = 1, timeout_s: float = 30) -> str:
    with anyio.fail_after(timeout_s):
        while True:
            apath = anyio.Path(path)
            content = await apath.read_text() if await apath.exists() else ""
            if content.count(text) >= count:
                return content
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_pause_and_resume_mid_computation(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    rounds = 16384 * 12
    serial = tmp_path / "serial.log"
    vmm = await VmmProcess.launch(tmp_path / "vm")
    try:
        cfg = machine(guest, tmp_path, f"compute {rounds}")
        await vmm.configure(msgspec.convert(cfg, MachineConfig, dec_hook=_path))
        await vmm.start()
        await _wait_for(serial, ".", 2)
        assert (await vmm.pause()).state is VmState.PAUSED
        frozen = serial.read_text()
        await anyio.sleep(0.5)
        assert serial.read_text() == frozen, "no guest progress while paused"
        assert (await vmm.state()).state is VmState.PAUSED
        assert (await vmm.resume()).state is VmState.RUNNING
        report = await vmm.wait(60)
        assert report.exit is not None and report.exit.reason == "reset"
        assert serial.read_text().endswith(f"compute={xorshift_result(rounds):016x}\n")
        assert frozen.count(".") < rounds // 16384
    finally:
        await vmm.stop()


@pytest.mark.anyio
async def test_spinning_guest_is_stopped_by_the_api(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    vmm = await VmmProcess.launch(tmp_path / "vm")
    try:
        cfg = machine(guest, tmp_path, "spin")
        await vmm.configure(msgspec.convert(cfg, MachineConfig, dec_hook=_path))
        await vmm.start()
        await _wait_for(tmp_path / "serial.log", "spin\n")
        assert (await vmm.wait(0.2)).state is VmState.RUNNING
        final = await vmm.stop()
        assert final is not None
        assert final.exit is not None and final.exit.reason == "stopped"
        assert final.clean
        assert vmm.process.returncode == 0
    finally:
        await vmm.kill()


def _raw_request(sock_path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        # The VMM answers an oversized line as soon as it passes the limit and hangs
        # up, possibly before we finish sending it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


@pytest.mark.anyio
async def test_garbage_on_the_api_socket_gets_errors_and_the_vmm_survives(
    vmm_bin: str, tmp_path: Path
) -> None:
    vmm = await VmmProcess.launch(tmp_path / "vm")
    try:
        for payload in [
            b"garbage\n",
            b'{"op":"explode"}\n',
            b'{"op":"start","extra":1}\n',
            b'{"op":"configure","machine":{"memory_mib":"lots"}}\n',
            b"\xff\xfe\x00\n",
            b"[" * 100_000 + b"\n",
            b"x" * (2 << 20) + b"\n",
        ]:
            answer = await anyio.to_thread.run_sync(_raw_request, vmm.socket, payload)
            assert answer["ok"] is False
            assert answer["error"]["kind"] == "bad_request"
        assert (await vmm.state()).state is VmState.NOT_CONFIGURED
    finally:
        await vmm.stop()


# ---- the microvm backend ----------------------------------------------------------


@pytest.mark.anyio
async def test_microvm_backend_reports_the_doctors_reason(
    doctor_report: DoctorReport, tmp_path: Path
) -> None:
    verdict = doctor_report.backend("microvm")
    runtime = MicroVmRuntime(
        kernel=tmp_path / "vmlinux", settings=load_settings(), doctor=doctor_report
    )
    if verdict.available:
        pytest.skip("this host runs full guests; see test_linux_guest_boots_to_its_console")
    with pytest.raises(BackendUnavailableError) as e:
        await runtime.create(SandboxSpec(id="sb-unavailable"))
    assert verdict.reason in str(e.value)


@pytest.mark.anyio
async def test_reap_kills_leftover_vmms(vmm_bin: str, tmp_path: Path) -> None:
    settings = Settings(runtime_dir=tmp_path / "run")
    runtime = MicroVmRuntime(settings=settings)
    kept = await VmmProcess.launch(runtime.sandboxes_dir / "keep")
    left = await VmmProcess.launch(runtime.sandboxes_dir / "leftover")
    try:
        assert await runtime.reap({"keep"}) == ["leftover"]
        with anyio.fail_after(10):
            await left.process.wait()
        assert left.process.returncode == -signal.SIGKILL
        assert not (runtime.sandboxes_dir / "leftover").exists()
        assert kept.process.returncode is None
    finally:
        await kept.stop()
        await left.kill()
