"""virtio-blk and virtio-vsock through a real `tartarus-vmm`, driven by a probe guest.

The guest (rust/vmm/guests/virtio_probe.S) is a polling virtio-mmio driver: it finds
its devices by scanning the MMIO windows, negotiates VERSION_1, sets up split rings and
checks what comes back, so these tests run on this host's emulated KVM too.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tartarus.binaries import find_binary
from tartarus.host.doctor import DoctorReport
from tests.support.probe_guests import build_probe_guest

pytestmark = pytest.mark.timeout(180)
PATTERN_KEY = 0x5441525441525553


@pytest.fixture(scope="module")
def guest() -> Path:
    return build_probe_guest("virtio_probe")


@pytest.fixture(scope="module")
def vmm_bin(doctor_report: DoctorReport) -> str:
    kvm = doctor_report.kernel.kvm
    if not kvm.openable:
        pytest.skip(f"no usable /dev/kvm: {kvm.detail}")
    return str(find_binary("tartarus-vmm"))


def _config(guest: Path, tmp_path: Path, cmdline: str, **extra: Any) -> Path:
    config = {
        "memory_mib": 16,
        "kernel": str(guest),
        "cmdline": cmdline,
        "boot_protocol": "linux64",
        "serial": {"kind": "file", "path": str(tmp_path / "serial.log")},
        "wall_clock_limit_ms": 120_000,
        **extra,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def _run(vmm_bin: str, config: Path) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [vmm_bin, "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert "panicked" not in proc.stderr
    out = json.loads(proc.stdout) if proc.stdout.strip() else {"exit": None}
    serial = (config.parent / "serial.log").read_text()
    return out, serial


def _qword_sum(data: bytes) -> int:
    return sum(array.array("Q", data)) & ((1 << 64) - 1)


def _pattern() -> bytes:
    return array.array("Q", [i ^ PATTERN_KEY for i in range(512)]).tobytes()


def test_guest_reads_the_whole_disk(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "root.img"
    data = os.urandom(384 << 10)
    disk.write_bytes(data)
    config = _config(guest, tmp_path, "b", drives=[{"path": str(disk), "read_only": True}])
    out, serial = _run(vmm_bin, config)
    assert out["exit"] == {"reason": "reset"}, serial
    assert serial == f"blk capacity={768:016x} sum={_qword_sum(data):016x}\n"
    assert disk.read_bytes() == data


def test_guest_writes_flushes_and_reads_back(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "data.img"
    data = bytearray(os.urandom(64 << 10))
    disk.write_bytes(data)
    config = _config(guest, tmp_path, "b", drives=[{"path": str(disk)}])
    _, serial = _run(vmm_bin, config)
    assert serial.endswith(" write ok\n"), serial
    after = disk.read_bytes()
    assert after[:4096] == _pattern()
    assert after[4096:] == data[4096:]


def test_two_disks_root_first(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    root, other = tmp_path / "root.img", tmp_path / "other.img"
    root.write_bytes(b"\x01" * 8192)
    other.write_bytes(b"\x02" * 4096)
    drives = [{"path": str(root), "read_only": True}, {"path": str(other)}]
    _, serial = _run(vmm_bin, _config(guest, tmp_path, "b", drives=drives))
    # The guest drives the first block device it finds: the root disk.
    assert serial == f"blk capacity={16:016x} sum={_qword_sum(root.read_bytes()):016x}\n"


def test_scratch_disk_is_created_and_wiped_on_exit(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    scratch = tmp_path / "scratch.img"
    drives = [{"path": str(scratch), "scratch": {"size_mib": 1, "wipe": "shred"}}]
    out, serial = _run(vmm_bin, _config(guest, tmp_path, "b", drives=drives))
    assert out["exit"] == {"reason": "reset"}
    # A fresh scratch disk reads as zeros; the guest's write round-trips; then it is gone.
    assert serial == f"blk capacity={2048:016x} sum={0:016x} write ok\n"
    assert not scratch.exists()


def test_rate_limited_disk_still_reads_correctly(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    disk = tmp_path / "slow.img"
    data = os.urandom(256 << 10)
    disk.write_bytes(data)
    drives = [
        {"path": str(disk), "read_only": True, "rate_limit": {"ops_per_sec": 8}},
    ]
    _, serial = _run(vmm_bin, _config(guest, tmp_path, "b", drives=drives))
    assert serial == f"blk capacity={512:016x} sum={_qword_sum(data):016x}\n"


def test_missing_or_bad_disk_configs_are_refused(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    for drives in (
        [{"path": str(tmp_path / "missing.img")}],
        [{"path": str(empty)}],
        [{"path": str(empty), "bogus": 1}],
    ):
        proc = subprocess.run(
            [vmm_bin, "run", "--config", str(_config(guest, tmp_path, "b", drives=drives))],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0
        assert "panicked" not in proc.stderr


class _Vm:
    def __init__(self, vmm_bin: str, guest: Path, tmp_path: Path) -> None:
        self.uds = tmp_path / "v.sock"
        self.serial = tmp_path / "serial.log"
        config = _config(guest, tmp_path, "v", vsock={"guest_cid": 3, "uds_path": str(self.uds)})
        self.proc = subprocess.Popen(
            [vmm_bin, "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while "vsock ready" not in (self.serial.read_text() if self.serial.exists() else ""):
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "guest never got ready"
            time.sleep(0.01)

    def connect(self, port: int = 1024) -> tuple[socket.socket, bytes]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(str(self.uds))
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                break
            line += b
        return s, line

    def finish(self) -> tuple[dict[str, Any], str]:
        out, err = self.proc.communicate(timeout=60)
        assert "panicked" not in err
        return json.loads(out), self.serial.read_text()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"stream ended after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_vsock_stream_echoes_through_the_guest(vmm_bin: str, guest: Path, tmp_path: Path) -> None:
    vm = _Vm(vmm_bin, guest, tmp_path)
    s, line = vm.connect()
    assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30
    s.sendall(b"hello")
    assert _recv_exact(s, 5) == b"hello"
    total = 0
    for size in (1, 4096, 65536, 100_000):
        payload = os.urandom(size)
        s.sendall(payload)
        assert _recv_exact(s, size) == payload
        total += size
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    s.close()
    out, serial = vm.finish()
    assert out["exit"] == {"reason": "reset"}
    assert f"vsock done bytes={5 + total:016x}" in serial
    assert not vm.uds.exists(), "the host socket is removed when the VMM exits"


def test_vsock_refused_port_and_bad_lines_close_the_socket(
    vmm_bin: str, guest: Path, tmp_path: Path
) -> None:
    vm = _Vm(vmm_bin, guest, tmp_path)
    s, line = vm.connect(port=77)
    assert line == b"", "a port nobody listens on is refused"
    s.close()
    for bad in (b"CONNECT x\n", b"GET / HTTP/1.1\r\n", b"A" * 64):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(30)
        raw.connect(str(vm.uds))
        raw.sendall(bad)
        with contextlib.suppress(ConnectionResetError):  # EOF or a reset: both mean closed
            assert raw.recv(16) == b""
        raw.close()
    s, line = vm.connect()
    assert line.startswith(b"OK ")
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    out, _ = vm.finish()
    assert out["exit"] == {"reason": "reset"}
