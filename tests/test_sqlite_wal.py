"""Switching a shared database to WAL waits out another process's lock instead of
failing at once with "database is locked" (SQLite's busy handler does not cover it)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tartarus.sqlite_wal import enable_wal

HOLD = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.timeout(60)
def test_waits_for_another_process_then_switches(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    holder = _hold_lock(path, 0.5)
    db = sqlite3.connect(path, timeout=0)
    enable_wal(db, timeout_s=20)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert holder.wait(10) == 0


@pytest.mark.timeout(60)
def test_gives_up_with_sqlites_error_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    holder = _hold_lock(path, 5)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enable_wal(sqlite3.connect(path, timeout=0), timeout_s=0.2)
    finally:
        holder.kill()
        holder.wait()
