"""API keys: format, hashed storage, expiry, revocation, rotation, privilege limits, and
`tartarus auth keys` against a real server."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tartarus.auth.keys import KeyStore
from tests.support.auth import call, make_key
from tests.support.server import Server, running_server, server_env

pytestmark = pytest.mark.timeout(120)


def test_key_format_and_hashed_storage(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "auth.db")
    key, token = store.create(tenant="acme", name="ci", roles=["developer"], created_by="t")
    assert token.startswith(f"tsk_{key.id}_") and len(token) == 4 + 12 + 1 + 43
    assert store.verify(token) is not None
    store.close()
    raw = (tmp_path / "auth.db").read_bytes()
    secret = token.rsplit("_", 1)[1]
    assert secret.encode() not in raw
    stored = sqlite3.connect(tmp_path / "auth.db").execute("SELECT hash FROM api_keys").fetchone()
    assert len(stored[0]) == 64 and secret not in stored[0]


def test_wrong_secret_expired_and_revoked_keys_fail(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "auth.db")
    key, token = store.create(tenant="acme", name="a", roles=["viewer"], created_by="t")
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify(f"tsk_ffffffffffff_{token.rsplit('_', 1)[1]}") is None
    assert store.verify("tsk_garbage") is None
    _, soon = store.create(
        tenant="acme", name="b", roles=["viewer"], created_by="t", expires_at=time.time() - 1
    )
    assert store.verify(soon) is None
    store.revoke(key.id)
    assert store.verify(token) is None
    assert not store.any_active()


def test_rotation_keeps_the_old_key_for_the_grace_period(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "auth.db")
    old, old_token = store.create(tenant="acme", name="a", roles=["viewer"], created_by="t")
    new, new_token = store.rotate(old.id, grace_s=3600, created_by="t")
    assert new.rotated_from == old.id and new.tenant == "acme" and new.roles == ["viewer"]
    assert store.verify(old_token) is not None and store.verify(new_token) is not None
    _, newest = store.rotate(new.id, grace_s=0, created_by="t")
    assert store.verify(new_token) is None and store.verify(newest) is not None


def tartarus(server: Server, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(server.env, TARTARUS_URL=server.url) | env_extra
    return subprocess.run(
        [sys.executable, "-m", "tartarus", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_create_list_rotate_revoke(tmp_path: Path) -> None:
    with running_server(tmp_path, env=server_env(tmp_path)) as server:
        # Loopback TCP with nothing configured is open (zero config) ...
        assert call(server, None, "GET", "/v1/sandboxes").status == 200
        out = tartarus(
            server,
            "auth",
            "keys",
            "create",
            "--name",
            "ci",
            "--role",
            "developer",
            "--tenant",
            "acme",
            "--expires",
            "30d",
            "--json",
        )
        assert out.returncode == 0, out.stderr
        created = json.loads(out.stdout)
        token = created["token"]
        assert created["key"]["tenant"] == "acme" and created["key"]["expires_at"]
        # ... and once a key exists, TCP needs credentials.
        assert call(server, None, "GET", "/v1/sandboxes").status == 401
        assert call(server, token, "GET", "/v1/sandboxes").status == 200
        listing = json.loads(tartarus(server, "auth", "keys", "list", "--json").stdout)
        assert [k["prefix"] for k in listing] == [created["key"]["prefix"]]
        assert token not in json.dumps(listing)
        # The CLI works over TCP with the key in the environment, and not without it.
        tcp = server.tcp_url or ""
        assert tartarus(server, "auth", "whoami", TARTARUS_URL=tcp).returncode != 0
        me = tartarus(server, "auth", "whoami", "--json", TARTARUS_URL=tcp, TARTARUS_API_KEY=token)
        assert json.loads(me.stdout)["tenant"] == "acme"
        rotated = json.loads(
            tartarus(
                server, "auth", "keys", "rotate", created["key"]["prefix"], "--grace", "0", "--json"
            ).stdout
        )
        assert call(server, token, "GET", "/v1/sandboxes").status == 401
        new_token = rotated["token"]
        assert call(server, new_token, "GET", "/v1/sandboxes").status == 200
        out = tartarus(server, "auth", "keys", "revoke", rotated["key"]["id"])
        assert out.returncode == 0, out.stderr
        assert call(server, new_token, "GET", "/v1/sandboxes").status == 401
        missing = tartarus(server, "auth", "keys", "revoke", "ffffffffffff")
        assert missing.returncode == 3  # not found


def test_keys_cannot_grant_more_than_their_holder(tmp_path: Path) -> None:
    with running_server(tmp_path, env=server_env(tmp_path)) as server:
        _, tadmin = make_key(server, "acme", ["tenant-admin"])
        ok = call(server, tadmin, "POST", "/v1/auth/keys", {"name": "d", "roles": ["developer"]})
        assert ok.status == 201 and ok.json()["key"]["tenant"] == "acme"
        for body in (
            {"name": "x", "roles": ["admin"]},
            {"name": "x", "roles": ["node-agent"]},
        ):
            assert call(server, tadmin, "POST", "/v1/auth/keys", body).status == 403
        other = call(
            server,
            tadmin,
            "POST",
            "/v1/auth/keys",
            {"name": "x", "roles": ["viewer"], "tenant": "globex"},
        )
        assert other.status == 404
        unknown = call(server, tadmin, "POST", "/v1/auth/keys", {"name": "x", "roles": ["root"]})
        assert unknown.status == 422
        # An operator key in the tenant cannot be revoked by the tenant's admin.
        admin_id, _ = make_key(server, "acme", ["admin"])
        assert call(server, tadmin, "DELETE", f"/v1/auth/keys/{admin_id}").status == 403


def test_static_key_still_works(tmp_path: Path) -> None:
    env = server_env(tmp_path, TARTARUS_API_KEY="bootstrap-key-123")
    with running_server(tmp_path, env=env) as server:
        me = call(server, "bootstrap-key-123", "GET", "/v1/auth/whoami").json()
        assert me["method"] == "static-key" and "admin:tenants" in me["permissions"]
        assert call(server, "bootstrap-key-12", "GET", "/v1/auth/whoami").status == 401
