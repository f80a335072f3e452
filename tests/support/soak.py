"""Soak and chaos runs against a real `tartarus serve` on one host: N sandboxes created,
used (exec, files, streamed output) and killed by C concurrent SDK clients on the jail
and gVisor, with faults injected while loaded; then what leaked is counted and the
invariants are checked. `tests/test_soak.py` runs a short one in `make test`;
`python -m benches.bench_soak` a long one.

Faults (each once, mid-load):
- `server-kill`: kill -9 of the API server, started again on the same state; clients
  keep going (the SDK retries creates with their idempotency key; the other steps are
  retried here, as a user's code would);
- `sandbox-kill`: kill -9 of a sandbox's host processes (the jail's supervisor, or
  gVisor's runsc); the sandbox is then killed through the API;
- `slow-client`: a client starts a stream of output and never reads it; the server's
  memory must stay bounded while the others go on;
- `disk-full`: the state directory (a small ext4 image, loop-mounted, for the run) is
  filled for a few seconds; what fails then must fail with a clear error, and the
  server must go on once there is room again.

"Lost" is an acknowledged sandbox the server no longer knows, or a step whose answer
was wrong. Leaks are counted before against after, by kind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import msgspec

from tartarus import _core
from tartarus.api.types import SandboxPage
from tartarus.endpoint import Endpoint
from tartarus.host.procfs import exited
from tartarus.network.ebpf import PIN_DIR
from tartarus.policy.audit_log import AuditLog
from tartarus.sdk.client import Client
from tartarus.sdk.errors import ApiError, ServerUnreachableError, UnavailableError
from tartarus.sdk.sandbox import Sandbox
from tartarus.sdk.wire import WireError
from tests.support.scratch_disk import make_ext4
from tests.support.server import (
    Server,
    processes_mentioning,
    server_env,
    start_server,
)

T = TypeVar("T")

# In this order while the load runs (the slow client holds the line longest: last).
FAULTS = ("disk-full", "server-kill", "sandbox-kill", "slow-client")
# What a client tries again, for this long, as a user's code would through a restart.
_TRANSIENT = (
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    aiohttp.ClientPayloadError,
    WireError,
    ServerUnreachableError,
    UnavailableError,
)
RETRY_S = 60.0
# Messages kept per kind of failure in the report.
DETAILS_PER_KIND = 3
PAYLOAD = bytes(range(256)) * 256  # 64 KiB


@dataclass(frozen=True)
class SoakPlan:
    sandboxes: int
    concurrency: int
    backends: tuple[str, ...]
    faults: tuple[str, ...] = FAULTS
    # The tenant may hold this many sandboxes at once (a policy the run applies).
    max_sandboxes: int = 0
    # The state directory's own filesystem, for `disk-full`.
    state_mib: int = 512
    # Every n-th sandbox gets a network (0: none).
    networked_every: int = 4
    # When set, the load runs this long (as many sandboxes as it takes), the faults
    # spread over the time; `sandboxes` is then ignored.
    minutes: float = 0.0


class Step(msgspec.Struct):
    count: int
    p50_ms: float
    p99_ms: float


class SoakReport(msgspec.Struct, kw_only=True):
    plan: dict[str, Any]
    seconds: float
    sandboxes_per_s: float
    steps: dict[str, Step]
    # Failures the clients saw, by kind (`<step>: <error>`), apart from the faults' own.
    errors: dict[str, int]
    # Failures while a fault held (the disk full), by fault and kind.
    fault_errors: dict[str, dict[str, int]]
    # Steps retried through a fault (a restart), by kind.
    retried: dict[str, int]
    lost: list[str]
    faults: dict[str, dict[str, Any]]
    leaks: dict[str, list[str]]
    invariants: dict[str, Any]
    # The servers' unhandled errors (their 500s), by the exception that ended each.
    server_errors: dict[str, int] = msgspec.field(default_factory=dict)
    # The first few messages of each kind in `errors` and `fault_errors`, with the
    # second of the run they came at: what a failed run is debugged from.
    error_details: dict[str, list[str]] = msgspec.field(default_factory=dict)


@dataclass
class _Run:
    plan: SoakPlan
    base: Path
    server: Server
    clients: list[Client]
    timings: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    fault_errors: dict[str, Counter[str]] = field(default_factory=dict)
    # The fault whose window is open now (its failures are its own).
    holding: str | None = None
    retried: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)
    failed_creates: int = 0
    # Failures by sandbox, to tell those of sandboxes a fault ended (a lost node's).
    failures_of: dict[str, list[str]] = field(default_factory=dict)
    # What a variant of the run keeps for its faults (the fleet's processes).
    extra: dict[str, Any] = field(default_factory=dict)
    error_details: dict[str, list[str]] = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)
    done: int = 0
    # Sandboxes the load started (all of `plan.sandboxes`, or as many as its minutes took).
    started: int = 0
    faults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def client(self) -> Client:
        return self.clients[0]

    def failed(self, step: str, error: BaseException, sandbox_id: str | None = None) -> None:
        kind = f"{step}: {_kind(error)}"
        details = self.error_details.setdefault(kind, [])
        if len(details) < DETAILS_PER_KIND:
            at = time.monotonic() - self.began
            details.append(f"at {at:.1f} s ({self.holding or 'no fault'}): {error}"[:500])
        if sandbox_id is not None:
            self.failures_of.setdefault(sandbox_id, []).append(kind)
        if self.holding is not None:
            self.fault_errors.setdefault(self.holding, Counter())[kind] += 1
        else:
            self.errors[kind] += 1

    async def timed(self, step: str, op: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Runs a step, trying it again through transient failures (a restart) unless
        `retry` is off (a create: the SDK retries it with its idempotency key, and a new
        attempt here would be a new create)."""
        deadline = time.monotonic() + RETRY_S
        while True:
            started = time.perf_counter()
            try:
                result = await op()
            except _TRANSIENT as e:
                if not retry or time.monotonic() > deadline:
                    raise
                self.retried[f"{step}: {_kind(e)}"] += 1
                await anyio.sleep(0.3)
                continue
            self.timings.setdefault(step, []).append(time.perf_counter() - started)
            return result


def _kind(error: BaseException) -> str:
    if isinstance(error, ApiError):
        return f"{error.status} {error.type.rsplit('/', 1)[-1]}"
    return type(error).__name__


async def _one(run: _Run, index: int) -> None:
    backend = run.plan.backends[index % len(run.plan.backends)]
    try:
        sb = await run.timed(
            "create",
            lambda: Sandbox.create(
                "base",
                backend=backend,
                trusted=True,
                # Some get a network: their link, rules and lease go through it all.
                network=bool(run.plan.networked_every) and index % run.plan.networked_every == 0,
                timeout=600,
                # Clients take turns between the API servers (a fleet has two).
                client=run.clients[index % len(run.clients)],
            ),
            retry=False,
        )
    except Exception as e:
        run.failed("create", e)
        run.failed_creates += 1
        # Counted as finished: the faults are paced by it, and a run whose creates
        # fail must end (and say so), not wait for sandboxes that will never be.
        run.done += 1
        return
    run.acknowledged.add(sb.id)
    step = "exec"
    try:
        result = await run.timed("exec", lambda: sb.commands.run(f"echo {index}"))
        if result.stdout != f"{index}\n":
            run.lost.append(f"{sb.id}: exec answered {result.stdout!r}")
        step = "files"
        await run.timed("files", lambda: sb.files.write("/tmp/soak", PAYLOAD))
        back = await run.timed("files", lambda: sb.files.read("/tmp/soak", format="bytes"))
        if back != PAYLOAD:
            run.lost.append(f"{sb.id}: the file came back changed ({len(back)} bytes)")
        step = "stream"
        lines: list[str] = []
        streamed = await run.timed(
            "stream",
            lambda: sb.commands.run("for i in 1 2 3 4 5; do echo $i; done", on_stdout=lines.append),
        )
        # A retried stream delivers its output again: the last five lines count.
        if streamed.exit_code != 0 or "".join(lines).split()[-5:] != ["1", "2", "3", "4", "5"]:
            run.lost.append(f"{sb.id}: streamed {lines!r}")
    except Exception as e:
        run.failed(step, e, sb.id)
    finally:
        try:
            await run.timed("kill", sb.kill)
        except ApiError as e:
            if e.status == 404:
                run.lost.append(f"{sb.id}: the server forgot it")
            else:
                run.failed("kill", e, sb.id)
        except Exception as e:
            run.failed("kill", e, sb.id)
        run.done += 1


# --- faults -----------------------------------------------------------------------------


async def _server_kill(run: _Run) -> None:
    env = run.server.env
    started = time.monotonic()
    run.server.process.send_signal(signal.SIGKILL)
    run.server.process.wait(timeout=30)
    run.server = await anyio.to_thread.run_sync(lambda: start_server(run.base, env=env))
    run.faults["server-kill"] = {"down_s": round(time.monotonic() - started, 3)}


def _host_processes(sandbox_id: str) -> list[int]:
    return [pid for pid, _ in processes_mentioning(sandbox_id)]


async def _sandbox_kill(run: _Run) -> None:
    """On each backend: a sandbox's host processes killed, then the sandbox through the
    API."""
    outcomes = {}
    for backend in run.plan.backends:
        create = functools.partial(
            Sandbox.create, "base", backend=backend, trusted=True, client=run.client
        )
        sb = await run.timed("create", create, retry=False)
        run.acknowledged.add(sb.id)
        pids = _host_processes(sb.id)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await _dead(pids)
        try:
            result = await sb.commands.run("echo after", timeout=10)
            seen = f"exit {result.exit_code}"
        except Exception as e:  # what the client saw is the finding
            seen = _kind(e)
        await run.timed("kill", sb.kill)
        outcomes[backend] = {"killed_pids": len(pids), "exec_after": seen}
    run.faults["sandbox-kill"] = outcomes


async def _dead(pids: list[int], within_s: float = 5.0) -> None:
    """Returns once every pid has exited (killed, reaped or not), or after `within_s`."""
    with anyio.move_on_after(within_s):
        for pid in pids:
            await exited(pid)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _slow_client(run: _Run) -> None:
    sb = await run.timed(
        "create",
        lambda: Sandbox.create(
            "base", backend=run.plan.backends[0], trusted=True, client=run.client
        ),
        retry=False,
    )
    run.acknowledged.add(sb.id)
    before = _rss_mib(run.server.process.pid)
    connector = aiohttp.UnixConnector(path=str(run.server.socket_path))
    body = {"cmd": "head -c 400000000 /dev/zero | base64"}
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.post(
            f"http://localhost/v1/sandboxes/{sb.id}/exec/stream", json=body
        )
        # Reads nothing for a while, as a stuck consumer would.
        await anyio.sleep(8)
        peak = _rss_mib(run.server.process.pid)
        response.close()
    await run.timed("kill", sb.kill)
    run.faults["slow-client"] = {
        "status": response.status,
        "server_rss_mib_before": round(before, 1),
        "server_rss_mib_while_stuck": round(peak, 1),
        "growth_mib": round(peak - before, 1),
    }


DISK_FULL_S = 4.0


async def _disk_full(run: _Run) -> None:
    """Fills the state directory's filesystem, holds it full, then frees it."""
    state = run.server.state_dir
    ballast = state / "soak-ballast"
    run.holding = "disk-full"
    try:
        with ballast.open("wb", buffering=0) as f:
            for size in (1 << 20, 4096):  # then the last blocks
                with contextlib.suppress(OSError):  # ENOSPC: full
                    while True:
                        f.write(bytes(size))
        free = shutil.disk_usage(state).free
        await anyio.sleep(DISK_FULL_S)
    finally:
        ballast.unlink(missing_ok=True)
        run.holding = None
    run.faults["disk-full"] = {"held_s": DISK_FULL_S, "free_bytes_while_full": free}


Action = Callable[["_Run"], Awaitable[None]]


async def _inject(run: _Run, actions: dict[str, Action]) -> None:
    """Each fault once, spread over the run."""
    plan = run.plan
    started = anyio.current_time()
    for k, fault in enumerate(plan.faults):
        share = (k + 1) / (len(plan.faults) + 1)
        if plan.minutes:
            await anyio.sleep_until(started + plan.minutes * 60 * share)
        else:
            while run.done < int(plan.sandboxes * share):  # noqa: ASYNC110 - a count
                await anyio.sleep(0.05)
        await actions[fault](run)


ONE_HOST_ACTIONS: dict[str, Action] = {
    "disk-full": _disk_full,
    "server-kill": _server_kill,
    "sandbox-kill": _sandbox_kill,
    "slow-client": _slow_client,
}


# --- what is left, and the invariants ----------------------------------------------------


def host_state(base: Path) -> dict[str, set[str]]:
    """What sandboxes leave on a host when they leak, by kind (names, for a diff)."""

    def names(path: Path, pattern: str = "*") -> set[str]:
        return {p.name for p in path.glob(pattern)} if path.is_dir() else set()

    cgroups: set[str] = set()
    root = Path("/sys/fs/cgroup/tartarus")
    if root.is_dir():
        cgroups = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}
    mounts = {
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if str(base) in line
    }
    try:
        ebpf = {link[0] for link in _core.egress_links(PIN_DIR)}
    except OSError:
        ebpf = set()
    sandboxes = {
        str(p.relative_to(base))
        for p in base.glob("**/sb-*")
        if p.is_dir() and "snapshots" not in p.parts and "images" not in p.parts
    }
    return {
        "processes": {f"{pid} {cmd[:120]}" for pid, cmd in processes_mentioning(str(base))},
        "mounts": mounts,
        "cgroups": cgroups,
        "network namespaces": names(Path("/run/netns"), "tt-*"),
        "links": names(Path("/sys/class/net"), "ttv*"),
        "leases": names(Path("/run/tartarus/net")),
        "egress filter entries": ebpf,
        "sandbox directories": sandboxes,
    }


def leaks(
    before: dict[str, set[str]], after: dict[str, set[str]], ours: set[int]
) -> dict[str, list[str]]:
    """What is there now and was not before, by kind; `ours`: the run's own processes
    (servers, agents), which are not leaks."""
    out = {}
    for kind, now in after.items():
        extra = now - before.get(kind, set())
        if kind == "processes":
            extra = {p for p in extra if int(p.split()[0]) not in ours}
        out[kind] = sorted(extra)
    return out


def row_leaks(databases: list[Path]) -> list[str]:
    """Rows a finished run must not leave in a server's (or node agent's) store: a
    record in a live state, an idempotency key claimed and never bound."""
    out: list[str] = []
    for path in databases:
        if not path.exists():
            continue
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            live = db.execute(
                "SELECT id, state FROM sandboxes WHERE state IN ('created', 'running', 'paused')"
            ).fetchall()
            unbound = db.execute("SELECT key FROM idempotency WHERE sandbox_id IS NULL").fetchall()
        finally:
            db.close()
        out += [f"{path}: sandbox {sandbox_id} {state}" for sandbox_id, state in live]
        out += [f"{path}: idempotency key {key} never bound" for (key,) in unbound]
    return out


async def invariants(run: _Run, audit_logs: list[Path]) -> dict[str, Any]:
    live = await run.client.call(
        "GET",
        "/v1/sandboxes",
        SandboxPage,
        params={"state": ["created", "running", "paused"], "limit": 500},
    )
    problems: list[str] = []
    entries = allowed = 0
    for path in audit_logs:
        audit = AuditLog(path, read_only=True)
        try:
            check = audit.verify()
            problems += [f"{path}: {p}" for p in check.problems]
            entries += check.entries
            after = 0
            while True:
                page, more = audit.entries(after_seq=after, limit=1000)
                allowed += sum(
                    1 for e, _ in page if e.kind == "admission" and e.outcome == "allowed"
                )
                if more is None:
                    break
                after = more
        finally:
            audit.close()
    # Quotas back to zero: the tenant can hold its whole quota again, at once.
    quota_ok = True
    if run.plan.max_sandboxes:
        made: list[Sandbox] = []
        try:
            async with anyio.create_task_group() as tg:

                async def take() -> None:
                    made.append(
                        await Sandbox.create(
                            "base", backend=run.plan.backends[0], trusted=True, client=run.client
                        )
                    )

                for _ in range(run.plan.max_sandboxes):
                    tg.start_soon(take)
        except BaseException:
            quota_ok = False
        finally:
            for sb in made:
                await sb.kill()
    acknowledged = len(run.acknowledged)
    return {
        "audit_chain_ok": not problems,
        "audit_problems": problems[:5],
        "audit_entries": entries,
        "allowed_admissions": allowed,
        "acknowledged_creates": acknowledged,
        # Every acknowledged create was admitted (an admission whose create then failed,
        # or was cut off by a fault and retried, has no acknowledged sandbox).
        "every_create_admitted": acknowledged <= allowed,
        "records_not_final": [
            f"{item.id} {item.state.value}"
            + ("" if item.id in run.acknowledged else " (never acknowledged)")
            for item in live.items
        ],
        "quota_back_to_zero": quota_ok,
    }


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def unhandled_errors(logs: list[str]) -> dict[str, int]:
    """The exception that ended each `unhandled error` a server logged (the last line of
    its traceback), counted: what a 500 was."""
    out: Counter[str] = Counter()
    for text in logs:
        last: str | None = None
        inside = False
        for line in [*text.splitlines(), "0000-00-00 00:00:00 end"]:
            if _RECORD_START.match(line):
                if inside and last is not None:
                    out[last[:200]] += 1
                inside = "unhandled error in" in line
                last = None
            elif (
                inside
                and line
                and not line[0].isspace()
                and not line.startswith(("Traceback", "During handling", "The above exception"))
            ):
                last = line
    return dict(out)


def _step(samples: list[float]) -> Step:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Step(
        count=len(ordered),
        p50_ms=round(statistics.median(ordered) * 1000, 2),
        p99_ms=round(p99 * 1000, 2),
    )


@contextlib.contextmanager
def _state_filesystem(base: Path, plan: SoakPlan) -> Iterator[None]:
    """The state directory on a small ext4 image of its own, for `disk-full`."""
    if "disk-full" not in plan.faults:
        yield
        return
    image, state = base / "state.img", base / "state"
    state.mkdir(parents=True, exist_ok=True)
    make_ext4(image, plan.state_mib)
    subprocess.run(["mount", "-o", "loop", str(image), str(state)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
        image.unlink(missing_ok=True)


async def soak(plan: SoakPlan, base: Path) -> SoakReport:
    """One run on a server of its own under `base` (a short path); stops it after."""
    with _state_filesystem(base, plan):
        return await _soak(plan, base)


async def run_load(run: _Run, actions: dict[str, Action]) -> float:
    """The policy, then the load with the faults; returns its seconds."""
    plan = run.plan
    if plan.max_sandboxes:
        policy = f"name: global\nspec: {{resources: {{max_sandboxes: {plan.max_sandboxes}}}}}\n"
        await run.client.call("PUT", "/v1/policies/global", json={"document": policy})
    started = time.monotonic()
    limit = anyio.Semaphore(plan.concurrency)
    until = started + plan.minutes * 60

    async def worker(index: int) -> None:
        try:
            await _one(run, index)
        finally:
            limit.release()

    def more(index: int) -> bool:
        return time.monotonic() < until if plan.minutes else index < plan.sandboxes

    async with anyio.create_task_group() as tg:
        tg.start_soon(_inject, run, actions)
        index = 0
        while more(index):
            await limit.acquire()
            tg.start_soon(worker, index)
            index += 1
    run.started = index
    return time.monotonic() - started


def report(
    run: _Run,
    seconds: float,
    checked: dict[str, Any],
    left: dict[str, list[str]],
    logs: list[str],
) -> SoakReport:
    plan = run.plan
    return SoakReport(
        plan={
            "sandboxes": run.started,
            "minutes": plan.minutes,
            "concurrency": plan.concurrency,
            "backends": list(plan.backends),
            "faults": list(plan.faults),
            "max_sandboxes": plan.max_sandboxes,
        },
        seconds=round(seconds, 2),
        sandboxes_per_s=round(run.started / seconds, 2),
        steps={name: _step(samples) for name, samples in sorted(run.timings.items())},
        errors=dict(run.errors),
        fault_errors={fault: dict(kinds) for fault, kinds in run.fault_errors.items()},
        retried=dict(run.retried),
        lost=run.lost,
        faults=run.faults,
        leaks=left,
        invariants=checked,
        server_errors=unhandled_errors(logs),
        error_details=run.error_details,
    )


async def _soak(plan: SoakPlan, base: Path) -> SoakReport:
    before = host_state(base)
    env = server_env(base)
    server = await anyio.to_thread.run_sync(lambda: start_server(base, env=env))
    client = Client(Endpoint.unix(server.socket_path))
    run = _Run(plan=plan, base=base, server=server, clients=[client])
    try:
        seconds = await run_load(run, ONE_HOST_ACTIONS)
        checked = await invariants(run, [run.server.state_dir / "audit.db"])
    finally:
        await client.close()
        run.server.stop()
    # After the server's graceful stop (it stops what it still runs): nothing it made
    # may be left.
    left = leaks(before, host_state(base), {run.server.process.pid})
    left["database rows"] = row_leaks([run.server.state_dir / "server.db"])
    return report(run, seconds, checked, left, [run.server.log()])
