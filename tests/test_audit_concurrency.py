"""Aeacus under concurrency: appends from many threads, several connections and several
OS processes on one database file each get the next sequence number and the chain
verifies end to end (a race for the same number used to fail an admission with 503)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import AuthMethod, Principal
from tartarus.auth.rbac import default_roles
from tartarus.errors import AdmissionDeniedError
from tartarus.policy.audit_log import APPEND_ATTEMPTS, AuditError, AuditLog
from tartarus.policy.judges import Judges

pytestmark = pytest.mark.timeout(180)


def assert_chain(path: Path, actions: set[str]) -> None:
    """The chain verifies, has one entry per action and contiguous numbers from 1."""
    log = AuditLog(path, read_only=True)
    try:
        result = log.verify()
        assert result.ok, result.problems
        assert result.entries == len(actions)
        seen: list[str] = []
        seqs: list[int] = []
        after: int | None = 0
        while after is not None:
            page, after = log.entries(after_seq=after, limit=500)
            seen += [e.action for e, _ in page]
            seqs += [e.seq for e, _ in page]
        assert seqs == list(range(1, len(actions) + 1))
        assert sorted(seen) == sorted(actions)
    finally:
        log.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_many_concurrent_appends_in_one_process(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    limiter = anyio.CapacityLimiter(32)

    async def one(i: int) -> None:
        await anyio.to_thread.run_sync(
            lambda: log.append(
                kind="admission",
                action=f"create-{i}",
                outcome="allowed",
                tenant=f"t{i % 7}",
                subject=f"key:{i}",
            ),
            limiter=limiter,
        )

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(one, i)
    log.close()
    assert_chain(path, {f"create-{i}" for i in range(200)})


def test_interleaved_connections_in_one_process(tmp_path: Path) -> None:
    """Two logs on one file (as two API servers share a state directory): each append
    links to the other's last entry instead of a head it remembered."""
    path = tmp_path / "audit.db"
    a, b = AuditLog(path), AuditLog(path)
    for i in range(20):
        (a if i % 3 else b).append(
            kind="access", action=f"act-{i}", outcome="allowed", tenant="acme", subject="k"
        )
    a.close()
    b.close()
    assert_chain(path, {f"act-{i}" for i in range(20)})


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from tartarus.policy.audit_log import AuditLog

    path, name, count, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    log = AuditLog(path)
    while time.time() < start:
        time.sleep(0.001)
    for i in range(count):
        log.append(kind="admission", action=f"{name}-{i}", outcome="allowed",
                   tenant=name, subject=f"key:{name}")
    log.close()
    """
)


def test_several_processes_append_to_one_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    AuditLog(path).close()  # the schema exists before the writers race
    processes, count = 4, 50
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), f"p{p}", str(count), str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(processes)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert_chain(path, {f"p{p}-{i}" for p in range(processes) for i in range(count)})


@settings(max_examples=8)
@given(threads=st.integers(1, 6), per_thread=st.integers(1, 15), logs=st.integers(1, 3))
def test_threads_over_connections_keep_one_chain(
    tmp_path_factory: pytest.TempPathFactory, threads: int, per_thread: int, logs: int
) -> None:
    path = tmp_path_factory.mktemp("chain") / "audit.db"
    opened = [AuditLog(path) for _ in range(logs)]
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(per_thread):
                opened[(t + i) % logs].append(
                    kind="access", action=f"{t}-{i}", outcome="allowed", tenant="", subject=""
                )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for log in opened:
        log.close()
    assert not errors
    assert_chain(path, {f"{t}-{i}" for t in range(threads) for i in range(per_thread)})


def test_a_head_that_keeps_moving_fails_clearly(tmp_path: Path) -> None:
    """Every insert is refused as a constraint violation (as if another writer took
    the number each time): the append retries a bounded number of times, then says so,
    and leaves the log writable."""
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    log.append(kind="access", action="first", outcome="allowed", tenant="", subject="")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute(
        "CREATE TRIGGER taken BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'taken'); END"
    )
    with pytest.raises(AuditError, match=f"gave up after {APPEND_ATTEMPTS} attempts"):
        log.append(kind="access", action="lost", outcome="allowed", tenant="", subject="")
    other.execute("DROP TRIGGER taken")
    other.close()
    log.append(kind="access", action="second", outcome="allowed", tenant="", subject="")
    log.close()
    assert_chain(path, {"first", "second"})


def test_admissions_on_two_servers_sharing_the_audit_log(tmp_path: Path) -> None:
    """The path that failed under load: two API servers (each its own `Judges` and
    `AuditLog`, one event loop each) admit concurrently into one audit file; every
    decision is recorded and none fails for want of the audit log."""
    path = tmp_path / "audit.db"
    per_server = 100
    request = msgspec.convert({"template": "base"}, CreateSandboxRequest)
    failures: list[BaseException] = []

    def server(n: int) -> None:
        judges = Judges(audit=AuditLog(path))

        async def admit(i: int) -> None:
            who = Principal(
                subject=f"key:s{n}-{i}",
                tenant=f"t{i % 5}",
                roles=("developer",),
                grants=default_roles().grants(("developer",)),
                method=AuthMethod.API_KEY,
            )
            try:
                (await judges.admit(who, request)).release()
            except AdmissionDeniedError:
                pass  # a quota refusal is a decision too, and is recorded
            except BaseException as e:
                failures.append(e)

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                for i in range(per_server):
                    tg.start_soon(admit, i)

        anyio.run(main)
        assert judges.audit is not None
        judges.audit.close()

    servers = [threading.Thread(target=server, args=(n,)) for n in range(2)]
    for t in servers:
        t.start()
    for t in servers:
        t.join()
    assert not failures, failures[:3]
    log = AuditLog(path, read_only=True)
    try:
        result = log.verify()
        assert result.ok and result.entries == 2 * per_server, result.problems
        subjects = {e.subject for e, _ in log.entries(limit=1000)[0]}
        assert subjects == {f"key:s{n}-{i}" for n in range(2) for i in range(per_server)}
    finally:
        log.close()
