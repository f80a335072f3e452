"""The code interpreter's round trip against a local Jupyter kernel, in the same run.

Ours: `sb.run_code(cell)` through the SDK and a real `tartarus serve` (unix socket) to a
sandbox on the `python-ds` template (the backend `auto` picks), whose interpreter keeps
its state between cells, on each backend asked for (`--backends`, default the one
`auto` picks and the jail). The peer: the same cells sent with `jupyter_client` to a local
`ipykernel` (no sandbox at all) and read until the kernel is idle, which is what a
notebook does. Two cells: a trivial one (`1 + 1`) and a matplotlib chart that comes back
as a PNG. The peer is the floor: the difference is what isolation and the API cost.

    python -m benches.bench_code [--runs N]
"""

from __future__ import annotations

import argparse
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from jupyter_client.manager import start_new_kernel
from tests.support.server import running_server, server_env

from benches.harness import Stats, report, write_result
from tartarus import Sandbox

TRIVIAL = "1 + 1"
CHART = (
    "import matplotlib.pyplot as plt\n"
    "fig, ax = plt.subplots(figsize=(4, 3))\n"
    "ax.plot([1, 2, 3, 4], [3, 1, 4, 1])\n"
    "plt.show()\n"
)
PRELUDE = "import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n"


def jupyter_execute(client: Any, code: str) -> dict[str, Any]:
    """Runs a cell on the kernel and collects its outputs until it is idle."""
    msg_id = client.execute(code)
    outputs: dict[str, Any] = {}
    while True:
        try:
            msg = client.get_iopub_msg(timeout=60)
        except queue.Empty as e:
            raise RuntimeError(f"the kernel did not answer {code!r}") from e
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind in ("execute_result", "display_data"):
            outputs.update(msg["content"]["data"])
        elif kind == "error":
            raise RuntimeError(msg["content"]["evalue"])
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return outputs


def measure_jupyter(runs: int) -> dict[str, Stats]:
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        jupyter_execute(client, "%matplotlib inline")
        results = {}
        for label, cell, key in (("trivial", TRIVIAL, "text/plain"), ("chart", CHART, "image/png")):
            for _ in range(2):
                assert key in jupyter_execute(client, cell)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                out = jupyter_execute(client, cell)
                samples.append(time.perf_counter() - started)
                assert key in out
            results[label] = Stats.of(samples)
        return results
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


async def measure_ours(url: str, runs: int, backend: str) -> tuple[dict[str, Stats], str]:
    async with Sandbox.create("python-ds", url=url, timeout=1200, backend=backend) as sb:
        await sb.run_code(PRELUDE)
        results = {}
        for label, cell in (("trivial", TRIVIAL), ("chart", CHART)):
            for _ in range(2):
                await sb.run_code(cell)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                execution = await sb.run_code(cell)
                samples.append(time.perf_counter() - started)
                assert execution.error is None, execution.error
                if label == "chart":
                    assert any(r.png for r in execution.results)
                else:
                    assert execution.text == "2"
            results[label] = Stats.of(samples)
        return results, sb.info.backend.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--backends", default="auto,jail", help="comma-separated backends to measure"
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tb-code-", dir="/tmp"))
    try:
        measured = {}
        with running_server(base, env=server_env(base)) as server:
            for wanted in args.backends.split(","):
                stats, backend = anyio.run(measure_ours, server.url, args.runs, wanted)
                measured[backend] = stats
        peer = measure_jupyter(args.runs)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results: dict[str, Any] = {"runs": args.runs, "jupyter_client": peer, "backends": {}}
    for backend, ours in measured.items():
        lines = {}
        for label in ("trivial", "chart"):
            title = f"run_code {label} cell ({backend})"
            lines[label] = report(title, ours[label], peer[label], "jupyter")
        results["backends"][backend] = {"ours": ours, "lines": lines}
    print(write_result("code", results))


if __name__ == "__main__":
    main()
