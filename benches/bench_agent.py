"""The agent's overhead: exec round trip and output streaming through `tartarus-agent`
against doing the same directly on the host, in the same run.

- exec round trip (`/bin/true`, start to exit status): the Python client → unix socket
  → agent → fork/exec → exit event, against a bare `os.fork` + `os.execv` +
  `os.waitpid` from Python;
- streaming throughput: `head -c 64M /dev/zero` through the agent's output stream
  (frames, sequence numbers, bounded buffer), against reading the same command's
  stdout from a plain pipe in Python.

The agent runs on the host (no sandbox), so this is the agent and protocol alone; the
backends' benches add their isolation on top.

Run: `python -m benches.bench_agent`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from tests.support.agent import HostAgentSandbox, running_agent

from benches.harness import Stats, measure, measure_async, ratio, report, write_result
from tartarus.runtime.types import ExecRequest, OutputChunk

EXEC_RUNS = 300
STREAM_BYTES = 64 << 20
STREAM_RUNS = 5
TRUE = "/bin/true"


def bare_fork_exec() -> None:
    pid = os.fork()
    if pid == 0:  # the child: exec at once (nothing else runs in it)
        try:
            os.execv(TRUE, [TRUE])  # noqa: S606 (the peer is a bare exec, no shell)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def bare_posix_spawn() -> None:
    """The cheapest way Python can start a process (vfork-style), for reference."""
    pid = os.posix_spawn(TRUE, [TRUE], {})
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def pipe_throughput() -> float:
    """MB/s reading `head -c N /dev/zero` from a plain pipe."""
    started = time.perf_counter()
    with subprocess.Popen(
        ["head", "-c", str(STREAM_BYTES), "/dev/zero"], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        total = 0
        while chunk := os.read(proc.stdout.fileno(), 1 << 20):
            total += len(chunk)
    elapsed = time.perf_counter() - started
    assert total == STREAM_BYTES
    return STREAM_BYTES / elapsed / 1e6


async def agent_exec(sb: HostAgentSandbox) -> None:
    result = await (await sb.exec(ExecRequest(argv=[TRUE]))).wait()
    assert result.exit.ok


async def agent_throughput(sb: HostAgentSandbox, buffer_bytes: int | None) -> tuple[float, int]:
    """MB/s of the same command's output through the agent, and chunks dropped."""
    started = time.perf_counter()
    execution = await sb.exec(
        ExecRequest(
            argv=["head", "-c", str(STREAM_BYTES), "/dev/zero"],
            timeout_s=120,
            buffer_bytes=buffer_bytes,
        )
    )
    total = 0
    dropped = 0
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            total += len(event.data)
        else:
            dropped = event.dropped_chunks
    elapsed = time.perf_counter() - started
    return total / elapsed / 1e6, dropped


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def run_agent_side(socket: Path) -> dict[str, Any]:
    sb = HostAgentSandbox(socket)
    await sb.start()
    try:
        exec_stats = await measure_async(lambda: agent_exec(sb), runs=EXEC_RUNS, warmup=10)
        streams: dict[str, Any] = {}
        # The default 16 MiB buffer drops what a slower reader cannot take; a buffer as
        # large as the output measures the lossless rate.
        for label, buffer_bytes in (
            ("default_buffer", None),
            ("whole_output_buffer", STREAM_BYTES),
        ):
            rates, drops = [], []
            for _ in range(STREAM_RUNS):
                rate, dropped = await agent_throughput(sb, buffer_bytes)
                rates.append(rate)
                drops.append(dropped)
            streams[label] = {"rates": rates, "dropped": drops}
    finally:
        await sb.close_agent()
    return {"exec": exec_stats, "streams": streams}


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp,
        running_agent(Path(tmp)) as (_, socket),
    ):
        ours = anyio.run(run_agent_side, socket)
    peer_exec: Stats = measure(bare_fork_exec, runs=EXEC_RUNS, warmup=10)
    spawn_exec: Stats = measure(bare_posix_spawn, runs=EXEC_RUNS, warmup=10)
    peer_rates = [pipe_throughput() for _ in range(STREAM_RUNS)]

    exec_line = report("exec round trip (/bin/true)", ours["exec"], peer_exec, "bare fork/exec")
    spawn_line = report("exec round trip (/bin/true)", ours["exec"], spawn_exec, "posix_spawn")
    peer_mbps = median(peer_rates)
    streaming: dict[str, Any] = {
        "bytes": STREAM_BYTES,
        "runs": STREAM_RUNS,
        "plain_pipe_mb_s": [round(r, 1) for r in peer_rates],
        "plain_pipe_median_mb_s": round(peer_mbps, 1),
    }
    for label, run in ours["streams"].items():
        ours_mbps = median(run["rates"])
        line = (
            f"streaming {STREAM_BYTES >> 20} MiB ({label}): agent {ours_mbps:.0f} MB/s"
            f" | plain pipe {peer_mbps:.0f} MB/s | agent/pipe {ours_mbps / peer_mbps:.2f}"
            f" | chunks dropped {run['dropped']}"
        )
        print(line)
        streaming[label] = {
            "agent_mb_s": [round(r, 1) for r in run["rates"]],
            "agent_median_mb_s": round(ours_mbps, 1),
            "ratio": round(ours_mbps / peer_mbps, 3),
            "dropped_chunks": run["dropped"],
            "summary": line,
        }
    path = write_result(
        "agent",
        {
            "exec_round_trip": {
                "command": TRUE,
                "runs": EXEC_RUNS,
                "agent": ours["exec"],
                "bare_fork_exec": peer_exec,
                "ratio_p50": ratio(ours["exec"], peer_exec),
                "summary": exec_line,
                "posix_spawn": spawn_exec,
                "ratio_p50_vs_posix_spawn": ratio(ours["exec"], spawn_exec),
                "summary_vs_posix_spawn": spawn_line,
            },
            "streaming": streaming,
            "load_average": os.getloadavg(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
