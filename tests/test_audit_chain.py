"""Aeacus: the audit log's hash chain survives retention and catches every kind of
tampering (altered, removed, reordered, re-hashed, truncated entries)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tartarus.policy.audit_log import AuditLog, entry_hash
from tartarus.secrets.redaction import redact, register
from tests.support.auth import call, make_key
from tests.support.server import running_server, server_env

pytestmark = pytest.mark.timeout(120)


def fill(path: Path, n: int = 10) -> AuditLog:
    log = AuditLog(path)
    for i in range(n):
        log.append(
            kind="access",
            action=f"act-{i}",
            outcome="allowed",
            tenant="acme" if i % 2 else "globex",
            subject=f"key:{i}",
            status=200,
        )
    return log


def db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def verify(path: Path, expect_head: str | None = None) -> list[str]:
    log = AuditLog(path, read_only=True)
    try:
        return log.verify(expect_head=expect_head).problems
    finally:
        log.close()


def test_intact_chain_verifies(tmp_path: Path) -> None:
    log = fill(tmp_path / "audit.db")
    result = log.verify()
    assert result.ok and result.entries == 10 and result.first_seq == 1 and result.last_seq == 10
    assert result.head == log.head()[1]
    entries, _ = log.entries(tenant="acme")
    assert [e.tenant for e, _ in entries] == ["acme"] * 5


def test_altered_entry_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    fill(path).close()
    with db(path) as conn:
        (doc,) = conn.execute("SELECT doc FROM audit WHERE seq = 4").fetchone()
        forged = doc.replace(b'"allowed"', b'"denied"')
        conn.execute("UPDATE audit SET doc = ? WHERE seq = 4", (forged,))
    assert any("entry 4" in p and "altered" in p for p in verify(path))


def test_rehashed_entry_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    fill(path).close()
    with db(path) as conn:
        (doc,) = conn.execute("SELECT doc FROM audit WHERE seq = 4").fetchone()
        forged = doc.replace(b"key:3", b"key:X")
        conn.execute(
            "UPDATE audit SET doc = ?, hash = ? WHERE seq = 4", (forged, entry_hash(forged))
        )
    problems = verify(path)
    assert problems and any("entry 5" in p and "does not follow" in p for p in problems)


def test_removed_and_reordered_entries_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    fill(path).close()
    with db(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 6")
    assert any("entry 7" in p for p in verify(path))
    other = tmp_path / "other.db"
    fill(other).close()
    with db(other) as conn:
        conn.execute("UPDATE audit SET seq = 100 WHERE seq = 3")
        conn.execute("UPDATE audit SET seq = 3 WHERE seq = 8")
        conn.execute("UPDATE audit SET seq = 8 WHERE seq = 100")
    assert len(verify(other)) >= 2


def test_truncation_and_rewrites_need_a_recorded_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = fill(path)
    _, head = log.head()
    log.close()
    with db(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq > 7")
    # Cutting off the end leaves a valid chain; only a head recorded elsewhere shows it.
    assert verify(path) == []
    assert any("expected head" in p for p in verify(path, expect_head=head))


def test_retention_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = fill(path)
    removed = log.prune(time.time() + 1)  # everything so far is "old"
    assert removed == 10
    log.append(kind="access", action="later", outcome="allowed", tenant="acme", subject="s")
    result = log.verify()
    assert result.ok, result.problems
    assert result.first_seq == 11  # the retention entry, then the new one
    entries, _ = log.entries()
    assert entries[0][0].kind == "retention" and entries[0][0].resource["anchor_seq"] == "10"
    log.close()
    with db(path) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 11")  # hide the retention record
    assert verify(path)
    with db(path) as conn:
        conn.execute("UPDATE audit_anchor SET seq = 5")  # or move the anchor
    assert verify(path)


def test_secrets_are_redacted_from_entries(tmp_path: Path) -> None:
    register("hunter2-very-secret")
    log = AuditLog(tmp_path / "audit.db", redact=redact)
    entry = log.append(
        kind="access",
        action="exec",
        outcome="failed",
        tenant="acme",
        subject="s",
        detail="password hunter2-very-secret refused",
        resource={"path": "/x/hunter2-very-secret"},
    )
    assert "hunter2-very-secret" not in json.dumps(entry.detail + str(entry.resource))
    log.close()
    assert b"hunter2-very-secret" not in (tmp_path / "audit.db").read_bytes()


def test_cli_verify_and_server_records(tmp_path: Path) -> None:
    with running_server(tmp_path, env=server_env(tmp_path)) as server:
        _, viewer = make_key(server, "acme", ["viewer"])
        assert call(server, viewer, "DELETE", "/v1/sandboxes/sb-0000000000000001").status == 403
        assert call(server, "tsk_nope", "GET", "/v1/sandboxes").status == 401
        remote = server.raw("GET", "/v1/audit/verify").json()
        assert remote["ok"] and remote["entries"] >= 3
        page = server.raw("GET", "/v1/audit?limit=1000").json()["items"]
        outcomes = [(e["action"], e["outcome"]) for e in page]
        assert ("create_key", "allowed") in outcomes
        assert ("delete_sandbox", "denied") in outcomes
        assert any(o == "unauthenticated" for _, o in outcomes)
        assert all(e["hash"] and e["prev"] for e in page)
    audit_db = server.state_dir / "audit.db"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tartarus", "audit", *args, "--db", str(audit_db)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = cli("verify", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    head = cli("head").stdout.split()[1]
    with db(audit_db) as conn:
        conn.execute("UPDATE audit SET doc = replace(doc, 'denied', 'allowed')")
    bad = cli("verify", "--expect-head", head)
    assert bad.returncode == 2
    assert "TAMPERED" in bad.stderr
