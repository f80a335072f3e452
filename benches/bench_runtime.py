"""Runtime benchmarks: per backend, sandbox create → first exec result against its raw
peer in the same run, run after run in turn (`runsc run`, `bwrap`, bare wasmtime-py
compiling each time and with its module compiled once; for wasm also a module not yet
compiled), exec round trip into a running sandbox (p50/p99), and output streaming
throughput (MB/s).

    python -m benches.bench_runtime            # writes benches/results/runtime.json
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import wasmtime

from benches.harness import Stats, measure_async, ratio, report, write_result
from tartarus.binaries import find_binary
from tartarus.config import load_settings
from tartarus.host.doctor import run_doctor
from tartarus.host.runsc import global_flags, unmount_null_netns
from tartarus.images import TemplateStore
from tartarus.runtime import oci_spec as oci
from tartarus.runtime.base import Runtime, Sandbox
from tartarus.runtime.gvisor import GvisorRuntime
from tartarus.runtime.jail import JailRuntime
from tartarus.runtime.types import ExecRequest, OutputChunk, Resources, SandboxSpec
from tartarus.runtime.wasm import WasmRuntime

ROOT = Path(__file__).resolve().parent.parent
TOOLBOX = ROOT / "tests" / "wasm" / "toolbox.wat"
STREAM_BYTES = 16 << 20
RUNS = {"jail": 30, "gvisor": 40, "wasm": 200}


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"


def spec(backend: str, name: str, rootfs: Path) -> SandboxSpec:
    if backend == "wasm":
        return SandboxSpec(id=name, wasm_module=TOOLBOX)
    return SandboxSpec(
        id=name, rootfs=rootfs, resources=Resources(memory_mib=256, pids=128, disk_mib=256)
    )


def echo_request(backend: str) -> ExecRequest:
    return ExecRequest(argv=["toolbox", "echo", "hi"] if backend == "wasm" else ["echo", "hi"])


async def create_to_first_result(
    runtime: Runtime,
    backend: str,
    rootfs: Path,
    ids: Counter,
    peers: dict[str, Callable[[], object]],
) -> tuple[Stats, dict[str, Stats]]:
    """Ours and each peer in turn, run after run: a machine that speeds up or slows down
    during the bench moves both sides alike."""

    async def once() -> float:
        sb = await runtime.create(spec(backend, ids.next("c"), rootfs))
        started = time.perf_counter()
        await sb.start()
        result = await (await sb.exec(echo_request(backend))).wait()
        elapsed = time.perf_counter() - started
        assert result.stdout == b"hi\n", result
        await sb.kill()
        return elapsed

    def peer_once(peer: Callable[[], object]) -> float:
        started = time.perf_counter()
        peer()
        return time.perf_counter() - started

    ours: list[float] = []
    theirs: dict[str, list[float]] = {name: [] for name in peers}
    for run in range(-2, RUNS[backend]):  # two warm-up rounds
        elapsed = await once()
        if run >= 0:
            ours.append(elapsed)
        for name, peer in peers.items():
            elapsed = await anyio.to_thread.run_sync(peer_once, peer)
            if run >= 0:
                theirs[name].append(elapsed)
    return Stats.of(ours), {name: Stats.of(samples) for name, samples in theirs.items()}


def bwrap_echo(rootfs: Path) -> Callable[[], object]:
    bwrap = shutil.which("bwrap")
    assert bwrap, "bwrap missing (apt-get install bubblewrap)"
    argv = [
        bwrap, "--ro-bind", str(rootfs), "/", "--proc", "/proc", "--dev", "/dev",
        "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent", "/bin/echo", "hi",
    ]  # fmt: skip
    return lambda: subprocess.run(argv, check=True, capture_output=True)


def jail_binary_echo(rootfs: Path, work: Path) -> Callable[[], object]:
    """`tartarus-jail run` of the echo itself (no agent): the jail against bwrap."""
    config = work / "echo.json"
    config.write_text(
        f'{{"id":"bench","rootfs":"{rootfs}","work_dir":"{work / "w"}",'
        '"argv":["/bin/echo","hi"],"scratch_mib":64}'
    )
    (work / "w").mkdir(exist_ok=True)
    argv = [str(find_binary("tartarus-jail")), "run", "--config", str(config)]
    return lambda: subprocess.run(argv, check=True, capture_output=True)


def runsc_echo(rootfs: Path, work: Path, runtime: GvisorRuntime) -> Callable[[], object]:
    """`runsc run` of the echo itself (no agent): the same runsc binary, platform and root
    overlay as the gvisor backend, so the ratio is the backend's own cost."""
    bundle = work / "bundle"
    bundle.mkdir(exist_ok=True)
    oci.write_bundle_config(
        bundle,
        oci.Spec(
            process=oci.Process(args=["/bin/echo", "hi"], cwd="/"), root=oci.Root(path=str(rootfs))
        ),
    )
    state = work / "runsc"
    state.mkdir(exist_ok=True)
    ids = Counter()
    runsc = runtime.resolve().path
    flags = [*global_flags(state, runtime.platform), "--overlay2=root:memory"]

    def once() -> None:
        name = ids.next("peer")
        subprocess.run([runsc, *flags, "run", "--bundle", str(bundle), name], check=True,
                       capture_output=True)  # fmt: skip
        unmount_null_netns(state)

    return once


def bare_wasmtime_echo(*, compiled_once: bool = False) -> Callable[[], object]:
    """What a caller of wasmtime-py writes by hand: compile, link WASI, run, capture;
    `compiled_once`: the engine, module and linker made once and reused (the floor for
    a backend that caches compiled modules, as ours does)."""
    kept: list[tuple[wasmtime.Engine, wasmtime.Module, wasmtime.Linker]] = []

    def once() -> None:
        if kept:
            engine, module, linker = kept[0]
        else:
            engine = wasmtime.Engine()
            module = wasmtime.Module.from_file(engine, str(TOOLBOX))
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            if compiled_once:
                kept.append((engine, module, linker))
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["toolbox", "echo", "hi"]
        out: list[bytes] = []
        wasi.stdout_custom = out.append
        store.set_wasi(wasi)
        instance = linker.instantiate(store, module)
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        assert b"".join(out) == b"hi\n"

    return once


async def exec_round_trip(sb: Sandbox, backend: str) -> Stats:
    async def once() -> None:
        await (await sb.exec(echo_request(backend))).wait()

    return await measure_async(once, runs=200 if backend != "gvisor" else 100, warmup=5)


async def stream_throughput(sb: Sandbox, backend: str) -> dict[str, float]:
    """MB/s of output received; chunks the agent's bounded buffer dropped (the reader
    here is a single task, slower than `cat`) are counted, not hidden."""
    if backend == "wasm":
        request = ExecRequest(argv=["toolbox", "flood", str(STREAM_BYTES)])
    else:
        await sb.write_file("/tmp/stream", b"\xab" * STREAM_BYTES)
        request = ExecRequest(argv=["cat", "/tmp/stream"])
    started = time.perf_counter()
    received = 0
    dropped = 0
    execution = await sb.exec(request)
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            received += len(event.data)
        else:
            dropped = event.dropped_chunks
    elapsed = time.perf_counter() - started
    return {
        "mb_per_s": round(received / elapsed / 1e6, 1),
        "received_bytes": received,
        "sent_bytes": STREAM_BYTES,
        "dropped_chunks": dropped,
    }


async def wasm_cold_start(runtime: Runtime, work: Path, runs: int = 30) -> Stats:
    """create → first result of a module no sandbox ran yet (a new file each run): the
    compile is in it, as in the bare peer."""
    samples = []
    for i in range(runs):
        module = work / f"cold-{i}.wat"
        shutil.copyfile(TOOLBOX, module)
        sb = await runtime.create(SandboxSpec(id=f"cold{i}", wasm_module=module))
        started = time.perf_counter()
        await sb.start()
        result = await (await sb.exec(echo_request("wasm"))).wait()
        samples.append(time.perf_counter() - started)
        assert result.stdout == b"hi\n", result
        await sb.kill()
    return Stats.of(samples)


async def bench_backend(
    backend: str, runtime: Runtime, rootfs: Path, work: Path, peers: dict[str, Callable[[], object]]
) -> dict[str, Any]:
    ids = Counter()
    ours, theirs = await create_to_first_result(runtime, backend, rootfs, ids, peers)
    out: dict[str, Any] = {"create_to_first_result": ours}
    for peer_name, peer_stats in theirs.items():
        line = report(f"{backend} create→first result", ours, peer_stats, peer_name)
        out[f"peer_{peer_name}"] = peer_stats
        out[f"ratio_vs_{peer_name}"] = ratio(ours, peer_stats)
        out.setdefault("lines", []).append(line)
    if backend == "wasm":
        cold = await wasm_cold_start(runtime, work)
        line = report("wasm create→first result, module not yet compiled", cold,
                      theirs["bare-wasmtime-py"], "bare-wasmtime-py")  # fmt: skip
        out["create_to_first_result_cold"] = cold
        out["ratio_cold_vs_bare-wasmtime-py"] = ratio(cold, theirs["bare-wasmtime-py"])
        out["lines"].append(line)
    sb = await runtime.create(spec(backend, "steady", rootfs))
    await sb.start()
    try:
        rt = await exec_round_trip(sb, backend)
        mbps = await stream_throughput(sb, backend)
    finally:
        await sb.kill()
    print(f"{backend} exec round trip: p50 {rt.p50_ms:.3f} ms p99 {rt.p99_ms:.3f} ms")
    print(f"{backend} streaming: {mbps}")
    out["exec_round_trip"] = rt
    out["streaming"] = mbps
    return out


async def main(only: set[str] | None = None) -> None:
    settings = load_settings()
    report_ = run_doctor(settings)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tartarus-bench-") as tmp:
        work = Path(tmp)
        rootfs = (await TemplateStore().resolve("base", ext4=False)).rootfs
        plans: list[tuple[str, Runtime, dict[str, Callable[[], object]]]] = []
        if report_.backend("jail").available:
            plans.append(
                (
                    "jail",
                    JailRuntime(work / "state"),
                    {
                        "bwrap": bwrap_echo(rootfs),
                        "tartarus-jail-direct": jail_binary_echo(rootfs, work),
                    },
                )
            )
        if report_.backend("gvisor").available:
            gvisor = GvisorRuntime(
                work / "state", runsc=settings.runsc, cache_dir=settings.cache_dir
            )
            plans.append(("gvisor", gvisor, {"runsc-run": runsc_echo(rootfs, work, gvisor)}))
        plans.append(
            (
                "wasm",
                WasmRuntime(work / "state"),
                {
                    "bare-wasmtime-py": bare_wasmtime_echo(),
                    "bare-wasmtime-py-compiled-once": bare_wasmtime_echo(compiled_once=True),
                },
            )
        )
        for backend, runtime, peers in plans:
            if only is not None and backend not in only:
                continue
            results[backend] = await bench_backend(backend, runtime, rootfs, work, peers)
            await runtime.reap(set())
    # A run of some backends has a file of its own; runtime.json is the run of all.
    path = write_result("runtime" if only is None else "runtime-" + "-".join(sorted(only)), results)
    print(f"wrote {path}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated backends (jail, gvisor, wasm)")
    args = parser.parse_args()
    anyio.run(main, set(args.only.split(",")) if args.only else None)


if __name__ == "__main__":
    run()
