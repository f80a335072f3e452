"""Pause and resume (Hypnos) on gVisor, against raw runsc in the same run.

Ours: `POST /v1/sandboxes/{id}/pause` and `/resume` on a real `tartarus serve` (the
snapshot filed in the blob store, the sandbox's namespace, template hold and record
handled, the agent connected again after the resume). The peer: `runsc checkpoint` of a
container with the same runsc, flags and root overlay, and `runsc restore --detach` of
its image, which is all a user of runsc alone would run. Each sandbox runs a counter
(the same shell loop) so both have a running process to save; the two take turns.

Memory freed: the proportional set size (PSS) of every host process of the sandbox
(sentry, gofer) before the pause, and after it (nothing should be left).

    python -m benches.bench_lifecycle
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from pathlib import Path

import anyio
from tests.support.server import processes_mentioning, running_server

from benches.bench_snapshots import raw_restore, rollup
from benches.harness import Stats, ratio, report, write_result
from tartarus.config import load_settings
from tartarus.host.doctor import run_doctor
from tartarus.images.store import TemplateStore
from tartarus.runtime.gvisor import GvisorRuntime
from tartarus.runtime.types import ExecRequest, Resources, SandboxSpec

RUNS = 15
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def pss_mib(marker: str) -> float:
    total = 0
    for pid, _ in processes_mentioning(marker):
        try:
            total += rollup(pid)["Pss"]
        except (OSError, KeyError):
            continue
    return round(total / 1024, 1)


async def main() -> None:
    settings = load_settings()
    verdict = run_doctor(settings).backend("gvisor")
    if not verdict.available:
        print(f"skipped: gvisor unavailable here: {verdict.reason}")
        return
    # Short paths: sockets live a few levels below.
    with tempfile.TemporaryDirectory(prefix="tt-bench-", dir="/tmp") as tmp:
        work = Path(tmp)
        runtime = GvisorRuntime(work / "raw", runsc=settings.runsc, cache_dir=settings.cache_dir)
        rootfs = (await TemplateStore().resolve("base", ext4=False)).rootfs
        raw = await runtime.create(
            SandboxSpec(id="rawpeer", rootfs=rootfs, resources=Resources(memory_mib=256))
        )
        await raw.start()
        await raw.exec(ExecRequest(argv=["sh", "-c", COUNTER], background=True))
        # Hung up as ours does before a checkpoint: runsc cannot save a host socket.
        await raw.agent.hang_up()
        raw.agent = None
        container = raw.container
        with running_server(work / "srv") as server:
            r = server.json("POST", "/v1/sandboxes", {"backend": "gvisor", "timeout_s": 3600})
            assert r.status == 201, r.body
            sb = r.json()["id"]
            r = server.json(
                "POST", f"/v1/sandboxes/{sb}/exec", {"cmd": COUNTER, "background": True}
            )
            assert r.status == 202, r.body
            await anyio.sleep(0.5)
            marker = f"tt-{sb}-"
            before_mib, after_mib = pss_mib(marker), 0.0
            pause, resume, checkpoint, restore = [], [], [], []
            for i in range(RUNS):
                started = time.perf_counter()
                r = server.raw("POST", f"/v1/sandboxes/{sb}/pause")
                pause.append(time.perf_counter() - started)
                assert r.status == 200, r.body
                after_mib = max(after_mib, pss_mib(marker))

                image = work / f"image-{i}"
                started = time.perf_counter()
                await runtime.runsc("checkpoint", "--image-path", str(image), container)
                checkpoint.append(time.perf_counter() - started)
                await runtime.runsc("delete", "--force", container, check=False)

                started = time.perf_counter()
                r = server.raw("POST", f"/v1/sandboxes/{sb}/resume")
                resume.append(time.perf_counter() - started)
                assert r.status == 200, r.body

                container = f"tt-rawpeer-{secrets.token_hex(3)}"
                log = work / "raw-restore.log"
                restore.append(await raw_restore(runtime, image, raw.bundle, container, log))
                shutil.rmtree(image, ignore_errors=True)
            count = server.json("POST", f"/v1/sandboxes/{sb}/exec", {"cmd": "cat /tmp/count"})
            assert int(count.json()["stdout"]) > 0
        await runtime.destroy(container)
        await raw.kill()
        await runtime.reap(set())

    publish(
        pause=pause,
        checkpoint=checkpoint,
        resume=resume,
        restore=restore,
        before_mib=before_mib,
        after_mib=after_mib,
    )


def publish(
    *,
    pause: list[float],
    checkpoint: list[float],
    resume: list[float],
    restore: list[float],
    before_mib: float,
    after_mib: float,
) -> None:
    a, b, c, d = (Stats.of(x) for x in (pause, checkpoint, resume, restore))
    lines = [
        report("gVisor pause (API, snapshot filed, sandbox ended)", a, b, "runsc checkpoint"),
        report("gVisor resume (API, same id, agent connected)", c, d, "runsc restore --detach"),
        f"gVisor memory of the sandbox's host processes (PSS): {before_mib} MiB running, "
        f"{after_mib} MiB paused",
    ]
    for line in lines:
        print(line)
    result = {
        "runs": RUNS,
        "pause_ms": a,
        "raw_checkpoint_ms": b,
        "pause_ratio": ratio(a, b),
        "resume_ms": c,
        "raw_restore_ms": d,
        "resume_ratio": ratio(c, d),
        "pss_running_mib": before_mib,
        "pss_paused_mib": after_mib,
        "lines": lines,
    }
    print(write_result("lifecycle", {"gvisor": result}))


if __name__ == "__main__":
    anyio.run(main)
