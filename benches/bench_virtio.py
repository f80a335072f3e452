"""virtio-blk and virtio-vsock through a real `tartarus-vmm`, against the host's own paths.

The virtio probe guest (rust/vmm/guests/virtio_probe.S) drives the devices by polling
(this host's emulated KVM runs it at about 1 µs per guest instruction):
- block throughput: the guest reads a 64 MiB disk image in 512 KiB requests; the VM is
  run with 1 and with 5 passes and the difference is timed, so boot and exit cancel out;
  peer: reading the same file on the host in 512 KiB reads (page cache: the ceiling
  here, since the device reads the image through the same cache);
- vsock round trip: 1-byte ping-pong through the hybrid unix socket into the guest
  and back; peer: the same ping-pong over a host unix socket pair to an echo thread;
- vsock throughput: a stream echoed by the guest with 128 KiB in flight; peer: the same
  windowed echo over a unix socket pair.

Run: `python -m benches.bench_virtio`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.probe_guests import build_probe_guest

from benches.harness import Stats, measure, report, write_result
from tartarus.binaries import find_binary

DISK_MIB = 64
PING_ROUNDS = 200
STREAM_BYTES = 16 << 20
WINDOW = 128 << 10
CHUNK = 64 << 10


def _config(guest: Path, workdir: Path, cmdline: str, **extra: Any) -> Path:
    config = {
        "memory_mib": 64,
        "kernel": str(guest),
        "cmdline": cmdline,
        "boot_protocol": "linux64",
        "serial": {"kind": "file", "path": str(workdir / "serial.log")},
        "wall_clock_limit_ms": 600_000,
        **extra,
    }
    path = workdir / f"config-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(config))
    return path


def _run_vm(vmm: str, config: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(
        [vmm, "run", "--config", str(config)], capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"tartarus-vmm failed: {proc.stdout} {proc.stderr[-2000:]}")
    return elapsed


def bench_block(vmm: str, guest: Path, workdir: Path) -> dict[str, Any]:
    disk = workdir / "disk.img"
    disk.write_bytes(os.urandom(DISK_MIB << 20))
    drives = {"drives": [{"path": str(disk), "read_only": True}]}
    one = [_run_vm(vmm, _config(guest, workdir, "B 1", **drives)) for _ in range(3)]
    five = [_run_vm(vmm, _config(guest, workdir, "B 5", **drives)) for _ in range(3)]
    per_pass = (min(five) - min(one)) / 4
    ours_mb_s = DISK_MIB * 1.048576 / per_pass

    def host_read() -> None:
        with disk.open("rb", buffering=0) as f:
            while f.read(512 << 10):
                pass

    host = measure(host_read, runs=10)
    host_mb_s = DISK_MIB * 1.048576 / (host.p50_ms / 1000)
    print(
        f"virtio-blk read: {ours_mb_s:.1f} MB/s through the guest | host file read "
        f"{host_mb_s:.1f} MB/s | ratio {host_mb_s / ours_mb_s:.1f}x slower"
    )
    return {
        "disk_mib": DISK_MIB,
        "request_kib": 512,
        "guest_mb_s": round(ours_mb_s, 2),
        "host_file_read_mb_s": round(host_mb_s, 2),
        "vm_1_pass_s": round(min(one), 3),
        "vm_5_passes_s": round(min(five), 3),
    }


class _GuestVm:
    """A VM running the vsock echo program; `connect()` opens a stream to port 1024."""

    def __init__(self, vmm: str, guest: Path, workdir: Path) -> None:
        self.uds = workdir / "v.sock"
        self.serial = workdir / "serial.log"
        self.serial.unlink(missing_ok=True)
        config = _config(guest, workdir, "v", vsock={"guest_cid": 3, "uds_path": str(self.uds)})
        self.proc = subprocess.Popen(
            [vmm, "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while "vsock ready" not in (self.serial.read_text() if self.serial.exists() else ""):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"guest did not get ready: {self.proc.stderr}")
            time.sleep(0.01)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.uds))
        s.sendall(b"CONNECT 1024\n")
        line = b""
        while not line.endswith(b"\n"):
            line += s.recv(1)
        assert line.startswith(b"OK "), line
        return s

    def close(self, s: socket.socket) -> str:
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
        s.close()
        self.proc.wait(timeout=60)
        return self.serial.read_text()


def _echo_peer() -> tuple[socket.socket, threading.Thread]:
    a, b = socket.socketpair()

    def echo() -> None:
        while data := b.recv(CHUNK):
            b.sendall(data)
        b.close()

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    return a, thread


def _ping(s: socket.socket) -> None:
    s.sendall(b"x")
    assert s.recv(1) == b"x"


def _stream(s: socket.socket, total: int) -> None:
    """Sends `total` bytes with at most WINDOW in flight and reads all of them back."""
    sent = received = 0
    block = os.urandom(CHUNK)
    reader_error: list[Exception] = []

    def reader() -> None:
        nonlocal received
        try:
            while received < total:
                data = s.recv(CHUNK)
                if not data:
                    reader_error.append(RuntimeError("stream closed early"))
                    return
                received += len(data)
        except OSError as e:
            reader_error.append(e)

    thread = threading.Thread(target=reader)
    thread.start()
    while sent < total:
        while sent - received >= WINDOW and not reader_error:
            time.sleep(0)
        n = min(CHUNK, total - sent)
        s.sendall(block[:n])
        sent += n
    thread.join()
    if reader_error:
        raise reader_error[0]


def _timed(fn: Callable[[], None]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_vsock(vmm: str, guest: Path, workdir: Path) -> dict[str, Any]:
    vm = _GuestVm(vmm, guest, workdir)
    s = vm.connect()
    ours_rtt: Stats = measure(lambda: _ping(s), runs=PING_ROUNDS, warmup=5)
    ours_s = _timed(lambda: _stream(s, STREAM_BYTES))
    serial = vm.close(s)
    echoed = int(serial.split("bytes=")[1].split()[0], 16)
    assert echoed == STREAM_BYTES + PING_ROUNDS + 5, serial

    peer, thread = _echo_peer()
    peer_rtt = measure(lambda: _ping(peer), runs=PING_ROUNDS, warmup=5)
    peer_s = _timed(lambda: _stream(peer, STREAM_BYTES))
    peer.close()
    thread.join()

    report("vsock 1-byte round trip", ours_rtt, peer_rtt, "unix socketpair")
    ours_mb_s = STREAM_BYTES / 1e6 / ours_s
    peer_mb_s = STREAM_BYTES / 1e6 / peer_s
    print(
        f"vsock echo stream: {ours_mb_s:.1f} MB/s | unix socketpair {peer_mb_s:.1f} MB/s | "
        f"ratio {peer_mb_s / ours_mb_s:.1f}x slower"
    )
    return {
        "round_trip_us": {
            "ours_p50": round(ours_rtt.p50_ms * 1000, 1),
            "ours_p99": round(ours_rtt.p99_ms * 1000, 1),
            "unix_pair_p50": round(peer_rtt.p50_ms * 1000, 1),
            "unix_pair_p99": round(peer_rtt.p99_ms * 1000, 1),
        },
        "echo_stream": {
            "bytes": STREAM_BYTES,
            "window_bytes": WINDOW,
            "ours_mb_s": round(ours_mb_s, 2),
            "unix_pair_mb_s": round(peer_mb_s, 2),
        },
    }


def main() -> None:
    vmm = str(find_binary("tartarus-vmm"))
    guest = build_probe_guest("virtio_probe")
    with tempfile.TemporaryDirectory(prefix="bench-virtio-") as tmp:
        workdir = Path(tmp)
        results = {
            "note": "probe guest under this host's emulated KVM (~1 µs per guest instruction)",
            "block": bench_block(vmm, guest, workdir),
            "vsock": bench_vsock(vmm, guest, workdir),
        }
    print(f"wrote {write_result('virtio', results)}")


if __name__ == "__main__":
    main()
