"""Sandbox networking (Styx): what a network grant costs, and what its link carries.

In one run, on the jail and gVisor backends the host has:
- create → first exec result (the whole of it: create makes the namespace) with a network
  grant against the same without one, interleaved: the grant adds a veth link, its
  nftables chains and a resolver to the namespace every sandbox gets;
- from a jail sandbox granted a network (its `python3`, the `python` template) to a
  server in a test "internet" namespace (tests/support/internet.py): TCP connect →
  greeting latency and upload throughput, against the same client (the host's
  `python3`) in a bare namespace on a plain veth pair the host routes, with no rules;
  the sandbox side runs once with the eBPF filter and once with the nftables fallback,
  so the filter's cost per packet shows against the equivalent nftables rule set (a
  burst of 64-byte UDP datagrams: microseconds per datagram sent through the link).

    python -m benches.bench_network            # writes benches/results/network.json

Root only (namespaces, veths, nftables). Traffic stays in namespaces the bench makes.
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from tests.support.internet import Internet, built_internet, run

from benches.harness import Stats, ratio, report, write_result
from tartarus.config import load_settings
from tartarus.host.doctor import run_doctor
from tartarus.images import TemplateStore
from tartarus.network.namespaces import NETNS_DIR
from tartarus.network.settings import EnforcerChoice, NetworkSettings
from tartarus.runtime.base import Runtime
from tartarus.runtime.gvisor import GvisorRuntime
from tartarus.runtime.jail import JailRuntime
from tartarus.runtime.types import ExecRequest, Resources, SandboxSpec

RUNS = {"jail": 60, "gvisor": 20}
UPLOAD_BYTES = 64 << 20
CONNECTS = 200
DATAGRAMS = 200_000

# Prints `connect_us <p50>` and `upload_mb_s <rate>` for the server at argv[1..3].
CLIENT = """
import socket, statistics, sys, time
address, hello, sink, upload = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
samples = []
for _ in range(int(sys.argv[5])):
    t = time.perf_counter()
    with socket.create_connection((address, hello)) as s:
        while not s.recv(64).endswith(b"\\n"):
            pass
    samples.append(time.perf_counter() - t)
print("connect_us", round(statistics.median(samples) * 1e6, 1))
chunk = bytes(1 << 20)
t = time.perf_counter()
with socket.create_connection((address, sink)) as s:
    for _ in range(upload // len(chunk)):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    got = int(s.makefile().readline())
elapsed = time.perf_counter() - t
assert got == upload, got
print("upload_mb_s", round(upload / elapsed / 1e6, 1))
# Unconnected: the port is closed, and the ICMP answers must not turn into send errors.
payload, count = bytes(64), int(sys.argv[6])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    t = time.perf_counter()
    for _ in range(count):
        s.sendto(payload, (address, 9))
    print("datagram_us", round((time.perf_counter() - t) / count * 1e6, 3))
"""


def _parse(out: str) -> dict[str, float]:
    return {k: float(v) for k, v in (line.split() for line in out.splitlines() if line)}


def spec(name: str, rootfs: Path, network: bool) -> SandboxSpec:
    return SandboxSpec(
        id=name,
        rootfs=rootfs,
        network=network,
        resources=Resources(memory_mib=256, pids=128, disk_mib=256),
    )


async def create_with_and_without(runtime: Runtime, rootfs: Path, runs: int) -> dict[str, Stats]:
    samples: dict[bool, list[float]] = {True: [], False: []}
    for i in range(runs + 2):
        # Interleaved, so drift hits both alike, and in turn first: a kill's namespace
        # goes on being torn down in the kernel while the next create runs.
        for network in (False, True) if i % 2 == 0 else (True, False):
            # From before create: the namespace and its link are made there.
            started = time.perf_counter()
            sb = await runtime.create(spec(f"n{i}{'g' if network else 'l'}", rootfs, network))
            await sb.start()
            result = await (await sb.exec(ExecRequest(argv=["echo", "hi"]))).wait()
            elapsed = time.perf_counter() - started
            await sb.kill()
            assert result.stdout == b"hi\n", result
            if i >= 2:
                samples[network].append(elapsed)
    return {"with_grant": Stats.of(samples[True]), "without": Stats.of(samples[False])}


async def link_from_sandbox(runtime: Runtime, python_rootfs: Path, inet: Internet) -> str:
    sb = await runtime.create(spec("link", python_rootfs, network=True))
    await sb.start()
    try:
        argv = ["python3", "-c", CLIENT, *_client_args(inet)]
        result = await (await sb.exec(ExecRequest(argv=argv, timeout_s=300))).wait()
        assert result.exit.ok, result
        return result.stdout.decode()
    finally:
        await sb.kill()


def _client_args(inet: Internet) -> list[str]:
    return [
        inet.address,
        str(inet.ports[0]),
        str(inet.sink_port),
        str(UPLOAD_BYTES),
        str(CONNECTS),
        str(DATAGRAMS),
    ]


def link_from_bare_veth(inet: Internet) -> str:
    """The same client in a namespace of its own on a plain veth pair (no rules, no NAT)."""
    tag = secrets.token_hex(3)
    netns, host_if = f"ttb-{tag}", f"ttb{tag}"
    octet, quad = secrets.randbelow(256), secrets.randbelow(64) * 4
    host_side, inside = f"198.18.{octet}.{quad + 1}", f"198.18.{octet}.{quad + 2}"
    run("ip", "netns", "add", netns)
    try:
        run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        run("ip", "addr", "add", f"{host_side}/30", "dev", host_if)
        run("ip", "link", "set", host_if, "up")
        for args in (
            ["addr", "add", f"{inside}/30", "dev", "eth0"],
            ["link", "set", "eth0", "up"],
            ["link", "set", "lo", "up"],
            ["route", "add", "default", "via", host_side],
        ):
            run("ip", "-n", netns, *args)
        argv = ["nsenter", f"--net={NETNS_DIR / netns}", sys.executable, "-c", CLIENT]
        return subprocess.run(
            [*argv, *_client_args(inet)], check=True, capture_output=True, text=True, timeout=300
        ).stdout
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


async def measure_link(python: Path, tmp: Path) -> dict[str, Any]:
    """The jail link with each enforcer against a bare veth, runs interleaved."""
    jails = {
        choice.value: JailRuntime(
            tmp / f"link-{choice.value}", network=NetworkSettings(enforcer=choice)
        )
        for choice in (EnforcerChoice.EBPF, EnforcerChoice.NFTABLES)
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in (*jails, "bare_veth")}
    with built_internet() as inet:
        for _ in range(3):
            for name, jail in jails.items():
                try:
                    runs[name].append(_parse(await link_from_sandbox(jail, python, inet)))
                finally:
                    await jail.reap(set())
            bare = await anyio.to_thread.run_sync(link_from_bare_veth, inet)
            runs["bare_veth"].append(_parse(bare))
    for jail in jails.values():
        jail.remove_cgroup_scope()
    link: dict[str, Any] = {}
    for key in ("connect_us", "upload_mb_s", "datagram_us"):
        p50 = {name: statistics.median(r[key] for r in got) for name, got in runs.items()}
        link[key] = {
            **p50,
            "ebpf_to_bare": round(p50["ebpf"] / p50["bare_veth"], 3),
            "nftables_to_bare": round(p50["nftables"] / p50["bare_veth"], 3),
            "ebpf_to_nftables": round(p50["ebpf"] / p50["nftables"], 3),
        }
        print(
            f"jail link {key}: eBPF {p50['ebpf']} | nftables {p50['nftables']} | bare veth "
            f"{p50['bare_veth']} | eBPF/bare {link[key]['ebpf_to_bare']} | "
            f"eBPF/nftables {link[key]['ebpf_to_nftables']}"
        )
    extra = round(link["datagram_us"]["ebpf"] - link["datagram_us"]["bare_veth"], 3)
    extra_nft = round(link["datagram_us"]["nftables"] - link["datagram_us"]["bare_veth"], 3)
    print(f"per datagram over a bare veth: eBPF +{extra} us, nftables +{extra_nft} us")
    return {
        **link,
        "runs": 3,
        "connects": CONNECTS,
        "upload_bytes": UPLOAD_BYTES,
        "datagrams": DATAGRAMS,
    }


async def main() -> None:
    settings = load_settings()
    doctor = run_doctor(settings)
    store = TemplateStore()
    base = (await store.resolve("base", ext4=False)).rootfs
    python = (await store.resolve("python", ext4=False)).rootfs
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-net-") as tmp:
        runtimes: dict[str, Runtime] = {}
        if doctor.backend("jail").available:
            runtimes["jail"] = JailRuntime(Path(tmp) / "jail")
        if doctor.backend("gvisor").available:
            runtimes["gvisor"] = GvisorRuntime(
                Path(tmp) / "gvisor", runsc=settings.runsc, cache_dir=settings.cache_dir
            )
        for backend, runtime in runtimes.items():
            try:
                both = await create_with_and_without(runtime, base, RUNS[backend])
            finally:
                await runtime.reap(set())
            ours, peer = both["with_grant"], both["without"]
            line = report(f"{backend} create→first result with a grant", ours, peer, "no grant")
            extra = round(ours.p50_ms - peer.p50_ms, 3)
            print(f"{backend}: a grant adds {extra} ms at p50 (goal: at most 2 ms)")
            results[f"{backend}_create"] = {
                **both,
                "ratio": ratio(ours, peer),
                "grant_adds_ms_p50": extra,
                "line": line,
            }
        if "jail" in runtimes:
            results["jail_link"] = await measure_link(python, Path(tmp))
        for runtime in runtimes.values():
            if isinstance(runtime, JailRuntime):
                runtime.remove_cgroup_scope()
    path = write_result("network", results)
    print(f"wrote {path}")


def run_bench() -> None:
    anyio.run(main)


if __name__ == "__main__":
    run_bench()
