"""API keys: `tsk_<id>_<secret>`, stored as a SHA-256 of the secret, never in clear.

The visible part (`tsk_<id>`) names the key in listings, logs and the audit trail; the
secret is 256 random bits, shown once when the key is made. Because the secret is
random and long, a fast hash is enough (nothing to brute-force) and keeps checking a
key cheap; the comparison is constant-time, and an unknown id costs the same work as
a known one. Each key carries a tenant, roles, an optional expiry and may be revoked
or rotated (a new secret, the old one kept valid for a grace period).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

import msgspec

from tartarus.errors import TartarusError
from tartarus.sqlite_wal import open_db

PREFIX = "tsk_"
_KEY = re.compile(r"^tsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()
# How often a key's last use is written (reads stay cheap on a busy key).
LAST_USED_RESOLUTION_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL,
    name         TEXT NOT NULL,
    roles        TEXT NOT NULL,
    hash         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    created_by   TEXT NOT NULL,
    expires_at   REAL,
    revoked_at   REAL,
    last_used_at REAL,
    rotated_from TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant, created_at);
"""


class ApiKeyError(TartarusError):
    """A key operation failed (unknown key, bad format)."""


class ApiKey(msgspec.Struct, kw_only=True):
    """A key as stored (without its secret)."""

    id: str
    tenant: str
    name: str
    roles: list[str]
    created_at: float
    created_by: str
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    rotated_from: str | None = None

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.id}"

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """API keys in SQLite (`STATE_DIR/auth.db`)."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path)
        self._db.executescript(SCHEMA)
        self._last_used: dict[str, float] = {}

    def close(self) -> None:
        self._db.close()

    def create(
        self,
        *,
        tenant: str,
        name: str,
        roles: list[str],
        created_by: str,
        expires_at: float | None = None,
        rotated_from: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Makes a key; returns it and the full token (the only time it is shown)."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        key = ApiKey(
            id=key_id,
            tenant=tenant,
            name=name,
            roles=roles,
            created_at=time.time(),
            created_by=created_by,
            expires_at=expires_at,
            rotated_from=rotated_from,
        )
        self._db.execute(
            "INSERT INTO api_keys (id, tenant, name, roles, hash, created_at, created_by,"
            " expires_at, rotated_from) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key.id,
                tenant,
                name,
                msgspec.json.encode(roles).decode(),
                _hash(secret),
                key.created_at,
                created_by,
                expires_at,
                rotated_from,
            ),
        )
        return key, f"{PREFIX}{key_id}_{secret}"

    _COLUMNS = (
        "id, tenant, name, roles, created_at, created_by, expires_at, revoked_at,"
        " last_used_at, rotated_from"
    )

    @staticmethod
    def _row(row: tuple[object, ...]) -> ApiKey:
        fields = dict(
            zip(
                (
                    "id",
                    "tenant",
                    "name",
                    "roles",
                    "created_at",
                    "created_by",
                    "expires_at",
                    "revoked_at",
                    "last_used_at",
                    "rotated_from",
                ),
                row,
                strict=True,
            )
        )
        fields["roles"] = msgspec.json.decode(str(fields["roles"]))
        return msgspec.convert(fields, ApiKey)

    def get(self, key_id: str) -> ApiKey | None:
        row = self._db.execute(
            f"SELECT {self._COLUMNS} FROM api_keys WHERE id=?",  # noqa: S608
            (key_id,),
        ).fetchone()
        return None if row is None else self._row(row)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        if tenant is None:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM api_keys ORDER BY created_at"  # noqa: S608
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT {self._COLUMNS} FROM api_keys WHERE tenant=?"  # noqa: S608
                " ORDER BY created_at",
                (tenant,),
            ).fetchall()
        return [self._row(r) for r in rows]

    def any_active(self) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM api_keys WHERE revoked_at IS NULL"
            " AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
            (time.time(),),
        ).fetchone()
        return row is not None

    def verify(self, token: str) -> ApiKey | None:
        """The active key whose token this is, or None. Constant-time in the secret."""
        match = _KEY.match(token)
        key_id, secret = (match.group(1), match.group(2)) if match else ("", token)
        row = self._db.execute(
            f"SELECT {self._COLUMNS}, hash FROM api_keys WHERE id=?",  # noqa: S608
            (key_id,),
        ).fetchone()
        stored = str(row[-1]) if row is not None else _DUMMY_HASH
        ok = hmac.compare_digest(stored.encode(), _hash(secret).encode())
        if row is None or not ok or match is None:
            return None
        key = self._row(row[:-1])
        now = time.time()
        if not key.active(now):
            return None
        if now - self._last_used.get(key.id, 0.0) > LAST_USED_RESOLUTION_S:
            self._last_used[key.id] = now
            self._db.execute("UPDATE api_keys SET last_used_at=? WHERE id=?", (now, key.id))
        return key

    def revoke(self, key_id: str) -> ApiKey:
        key = self.get(key_id)
        if key is None:
            raise ApiKeyError(f"no API key {key_id!r}")
        if key.revoked_at is None:
            key.revoked_at = time.time()
            self._db.execute(
                "UPDATE api_keys SET revoked_at=? WHERE id=?", (key.revoked_at, key_id)
            )
        return key

    def rotate(self, key_id: str, *, grace_s: float, created_by: str) -> tuple[ApiKey, str]:
        """A new key with the same tenant, name and roles; the old one stays valid for
        `grace_s` more seconds (0 ends it now), so clients can switch without an outage."""
        old = self.get(key_id)
        if old is None or not old.active(time.time()):
            raise ApiKeyError(f"no active API key {key_id!r} to rotate")
        new, token = self.create(
            tenant=old.tenant,
            name=old.name,
            roles=old.roles,
            created_by=created_by,
            expires_at=old.expires_at,
            rotated_from=old.id,
        )
        until = time.time() + grace_s
        if old.expires_at is None or old.expires_at > until:
            self._db.execute("UPDATE api_keys SET expires_at=? WHERE id=?", (until, old.id))
        return new, token
