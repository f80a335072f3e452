"""Opening SQLite databases that several processes share in WAL mode."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Switching to WAL takes an exclusive lock that SQLite does not wait for with its busy
# handler, so two processes opening a fresh database at once can see "database is
# locked" however long their timeout is.
_RETRY_S = 0.01


def enable_wal(db: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Puts `db` in WAL mode (it persists in the file), retrying while another process
    holds the lock for the same switch; gives up with SQLite's error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(_RETRY_S)
        else:
            return


def open_db(path: Path) -> sqlite3.Connection:
    """A state database shared by threads and processes: autocommit (callers open their
    own transactions), WAL, synchronous=NORMAL, and a 5 s wait for a busy lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    enable_wal(db)
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class ThreadConnections:
    """One connection per thread to a WAL database in autocommit mode, kept open:
    opening one and switching it to WAL costs more than most queries, and a sandbox
    create or restore makes several. Each thread uses only its own; `close` closes them
    all (from any thread), and the next use opens new ones."""

    def __init__(self, path: Path, timeout_s: float = 60.0) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[sqlite3.Connection] = []
        self._generation = 0

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        cached: tuple[int, sqlite3.Connection] | None = getattr(self._local, "db", None)
        if cached is None or cached[0] != self._generation:
            db = sqlite3.connect(
                self.path, timeout=self._timeout_s, isolation_level=None, check_same_thread=False
            )
            enable_wal(db)
            # WAL + NORMAL: durable across process crashes; a power cut can lose only
            # the last transactions.
            db.execute("PRAGMA synchronous=NORMAL")
            with self._lock:
                self._open.append(db)
                self._local.db = (self._generation, db)
        else:
            db = cached[1]
            if db.in_transaction:
                # A write whose ROLLBACK failed (a full disk) left one open.
                db.rollback()
        yield db

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            connections, self._open = self._open, []
        for db in connections:
            db.close()
