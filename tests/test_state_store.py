"""The server's SQLite store: migrations, records, cursor pagination, idempotency keys."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tartarus.node.store import (
    MIGRATIONS,
    ListFilter,
    SandboxRecord,
    Store,
    StoreError,
    decode_cursor,
    encode_cursor,
)
from tartarus.runtime.types import Backend, SandboxState


def record(i: int, state: SandboxState = SandboxState.RUNNING, **meta: str) -> SandboxRecord:
    return SandboxRecord(
        id=f"sb-{i:016x}",
        template="base" if i % 2 else "python",
        backend=Backend.GVISOR if i % 3 else Backend.JAIL,
        state=state,
        created_at=time.time(),
        metadata=dict(meta),
    )


def test_migrates_once_and_reopens(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = Store(db)
    assert store.schema_version == len(MIGRATIONS)
    store.insert(record(1))
    store.close()
    again = Store(db)
    assert again.schema_version == len(MIGRATIONS)
    found = again.get("sb-0000000000000001")
    assert found is not None
    assert found.state is SandboxState.RUNNING
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    Store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this tartarus"):
        Store(db)


def test_save_updates_state_and_live_lists_only_live(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    a, b = store.insert(record(1)), store.insert(record(2))
    b.state = SandboxState.STOPPED
    b.ended_at = time.time()
    store.save(b)
    assert [r.id for r in store.live()] == [a.id]


def test_filters(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    store.insert(record(1, team="red"))
    store.insert(record(2, team="blue"))
    store.insert(record(3, SandboxState.FAILED, team="red"))
    red = store.list(ListFilter(metadata=(("team", "red"),)))[0]
    assert [r.id[-1] for r in red] == ["1", "3"]
    running_red = store.list(
        ListFilter(states=(SandboxState.RUNNING,), metadata=(("team", "red"),))
    )[0]
    assert [r.id[-1] for r in running_red] == ["1"]
    assert [r.id[-1] for r in store.list(ListFilter(template="python"))[0]] == ["2"]
    assert [r.id[-1] for r in store.list(ListFilter(backend=Backend.JAIL))[0]] == ["3"]


@settings(max_examples=25, deadline=None)
@given(total=st.integers(0, 40), limit=st.integers(1, 12))
def test_pagination_visits_every_record_once(
    tmp_path_factory: pytest.TempPathFactory, total: int, limit: int
) -> None:
    store = Store(tmp_path_factory.mktemp("p") / "s.db")
    ids = [store.insert(record(i)).id for i in range(total)]
    seen: list[str] = []
    cursor = 0
    while True:
        page, next_seq = store.list(ListFilter(), after_seq=cursor, limit=limit)
        assert len(page) <= limit
        seen += [r.id for r in page]
        if next_seq is None:
            break
        cursor = decode_cursor(encode_cursor(next_seq))
    assert seen == ids


@pytest.mark.parametrize("bad", ["", "abc", "-1", "1" * 19, "\uff11\uff12"])
def test_bad_cursors_are_refused(bad: str) -> None:
    with pytest.raises(StoreError, match="invalid cursor"):
        decode_cursor(bad)


def test_idempotency_keys(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store.claim_key("k1", "fp") is None
    assert store.claim_key("k1", "fp") == ("fp", None)  # in flight
    store.bind_key("k1", "sb-1")
    assert store.claim_key("k1", "other") == ("fp", "sb-1")
    assert store.claim_key("k2", "fp") is None
    store.release_key("k2")
    assert store.claim_key("k2", "fp2") is None
    store.release_unbound_keys()
    assert store.claim_key("k2", "fp3") is None
    assert store.claim_key("k1", "fp") == ("fp", "sb-1")


def test_purge_forgets_old_ended_records(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    old = store.insert(record(1))
    old.state, old.ended_at = SandboxState.STOPPED, time.time() - 10_000
    store.save(old)
    live = store.insert(record(2))
    assert store.purge_ended(time.time() - 100) == 1
    assert store.get(old.id) is None
    assert store.get(live.id) is not None
