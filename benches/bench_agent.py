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


async def agent_throughput(sb: HostAgentSandbox) -> tuple[float, int]:
    """MB/s of the same command's output through the agent, and chunks dropped."""
    started = time.perf_counter()
    execution = await sb.exec(
        ExecRequest(argv=["head", "-c", str(STREAM_BYTES), "/dev/zero"], timeout_s=120)
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
        rates, drops = [], []
        for _ in range(STREAM_RUNS):
            rate, dropped = await agent_throughput(sb)
            rates.append(rate)
            drops.append(dropped)
    finally:
        await sb.close_agent()
    return {"exec": exec_stats, "rates": rates, "dropped": drops}


def main() -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp,
        running_agent(Path(tmp)) as (_, socket),
    ):
        ours = anyio.run(run_agent_side, socket)
    peer_exec: Stats = measure(bare_fork_exec, runs=EXEC_RUNS, warmup=10)
    peer_rates = [pipe_throughput() for _ in range(STREAM_RUNS)]

    exec_line = report("exec round trip (/bin/true)", ours["exec"], peer_exec, "bare fork/exec")
    ours_mbps, peer_mbps = median(ours["rates"]), median(peer_rates)
    stream_line = (
        f"streaming {STREAM_BYTES >> 20} MiB: agent {ours_mbps:.0f} MB/s | plain pipe"
        f" {peer_mbps:.0f} MB/s | agent/pipe {ours_mbps / peer_mbps:.2f}"
        f" | chunks dropped {ours['dropped']}"
    )
    print(stream_line)
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
            },
            "streaming": {
                "bytes": STREAM_BYTES,
                "runs": STREAM_RUNS,
                "agent_mb_s": [round(r, 1) for r in ours["rates"]],
                "plain_pipe_mb_s": [round(r, 1) for r in peer_rates],
                "agent_median_mb_s": round(ours_mbps, 1),
                "plain_pipe_median_mb_s": round(peer_mbps, 1),
                "ratio": round(ours_mbps / peer_mbps, 3),
                "dropped_chunks": ours["dropped"],
                "summary": stream_line,
            },
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
