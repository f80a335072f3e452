"""The encrypted local secret store: envelope encryption with AES-256-GCM.

Each secret has its own data key (DEK), which encrypts the value; the DEK is stored
wrapped (encrypted) by a key-encryption key (KEK) from a KMS-style key file. Both
encryptions bind the tenant and name as associated data, so a ciphertext moved to
another name or tenant fails to decrypt. The key file holds several KEKs: new secrets
use the primary one; `rotate_kek` adds a new primary and re-wraps every DEK (values are
not re-encrypted: the point of envelope encryption).

Key file (JSON, mode 0600):
    {"primary": "k-...", "keys": [{"id": "k-...", "material": "<base64 32 bytes>"}]}
"""

from __future__ import annotations

import base64
import os
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from msgspec import Meta

from tartarus.secrets.providers import SecretError
from tartarus.sqlite_wal import enable_wal

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
SecretName = Annotated[str, Meta(pattern=NAME_PATTERN)]

SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    tenant      TEXT NOT NULL,
    name        TEXT NOT NULL,
    kek_id      TEXT NOT NULL,
    wrap_nonce  BLOB NOT NULL,
    wrapped_dek BLOB NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
"""


class KekEntry(msgspec.Struct, kw_only=True):
    id: str
    material: str
    created_at: float = 0.0


class KeyFile(msgspec.Struct, kw_only=True):
    primary: str
    keys: list[KekEntry]


class SecretEntry(msgspec.Struct, kw_only=True):
    tenant: str
    name: str
    kek_id: str
    created_at: float
    updated_at: float


class Keyring:
    """The KEKs of a key file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            doc = msgspec.json.decode(path.read_bytes(), type=KeyFile)
        except FileNotFoundError:
            raise SecretError(
                f"no secret key file at {path}: make one with `tartarus secrets init`"
            ) from None
        except (OSError, msgspec.DecodeError) as e:
            raise SecretError(f"cannot read the secret key file {path}: {e}") from None
        if path.stat().st_mode & 0o077:
            raise SecretError(f"{path} is readable by others: chmod 600 it")
        self.primary = doc.primary
        self._keys: dict[str, bytes] = {}
        for entry in doc.keys:
            material = base64.b64decode(entry.material)
            if len(material) != 32:
                raise SecretError(f"{path}: key {entry.id!r} is not 32 bytes")
            self._keys[entry.id] = material
        if self.primary not in self._keys:
            raise SecretError(f"{path}: the primary key {self.primary!r} is missing")
        self._doc = doc

    def kek(self, kek_id: str) -> AESGCM:
        material = self._keys.get(kek_id)
        if material is None:
            raise SecretError(f"key {kek_id!r} is not in {self.path} any more")
        return AESGCM(material)

    @staticmethod
    def create(path: Path) -> Keyring:
        """Writes a new key file with one key (refuses to overwrite one)."""
        entry = _new_kek()
        _write_private(path, msgspec.json.encode(KeyFile(primary=entry.id, keys=[entry])), new=True)
        return Keyring(path)

    def add_primary(self) -> str:
        entry = _new_kek()
        doc = KeyFile(primary=entry.id, keys=[*self._doc.keys, entry])
        _write_private(self.path, msgspec.json.encode(doc), new=False)
        self._doc = doc
        self._keys[entry.id] = base64.b64decode(entry.material)
        self.primary = entry.id
        return entry.id


def _new_kek() -> KekEntry:
    return KekEntry(
        id=f"k-{int(time.time())}-{secrets.token_hex(3)}",
        material=base64.b64encode(AESGCM.generate_key(bit_length=256)).decode(),
        created_at=time.time(),
    )


def _write_private(path: Path, data: bytes, *, new: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if new and path.exists():
        raise SecretError(f"{path} exists already; it holds the keys of existing secrets")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def _aad(*parts: str) -> bytes:
    return "\x00".join(parts).encode()


class LocalSecretStore:
    """Secrets per tenant in SQLite (`STATE_DIR/secrets.db`), encrypted."""

    scheme = "local"

    def __init__(self, db_path: Path, key_file: Path) -> None:
        self.key_file = key_file
        self._keyring: Keyring | None = None
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        enable_wal(self._db)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    @property
    def keyring(self) -> Keyring:
        # Loaded on first use, so a server without local secrets needs no key file.
        if self._keyring is None:
            self._keyring = Keyring(self.key_file)
        return self._keyring

    def put(self, tenant: str, name: str, value: str) -> None:
        msgspec.convert(name, SecretName)
        ring = self.keyring
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(12)
        ciphertext = AESGCM(dek).encrypt(nonce, value.encode(), _aad(tenant, name))
        wrap_nonce = os.urandom(12)
        wrapped = ring.kek(ring.primary).encrypt(wrap_nonce, dek, _aad(ring.primary, tenant, name))
        now = time.time()
        self._db.execute(
            "INSERT INTO secrets (tenant, name, kek_id, wrap_nonce, wrapped_dek, nonce,"
            " ciphertext, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(tenant, name) DO UPDATE SET kek_id = excluded.kek_id,"
            " wrap_nonce = excluded.wrap_nonce, wrapped_dek = excluded.wrapped_dek,"
            " nonce = excluded.nonce, ciphertext = excluded.ciphertext,"
            " updated_at = excluded.updated_at",
            (tenant, name, ring.primary, wrap_nonce, wrapped, nonce, ciphertext, now, now),
        )

    def get(self, tenant: str, name: str) -> str:
        row = self._db.execute(
            "SELECT kek_id, wrap_nonce, wrapped_dek, nonce, ciphertext FROM secrets"
            " WHERE tenant = ? AND name = ?",
            (tenant, name),
        ).fetchone()
        if row is None:
            raise SecretError(f"secret local:{name}: tenant {tenant} has no such secret")
        kek_id, wrap_nonce, wrapped, nonce, ciphertext = row
        try:
            dek = self.keyring.kek(kek_id).decrypt(wrap_nonce, wrapped, _aad(kek_id, tenant, name))
            return AESGCM(dek).decrypt(nonce, ciphertext, _aad(tenant, name)).decode()
        except InvalidTag:
            raise SecretError(
                f"secret local:{name}: does not decrypt (altered, or the key file is wrong)"
            ) from None

    async def resolve(self, tenant: str, name: str) -> str:
        return self.get(tenant, name)

    def list(self, tenant: str | None = None) -> list[SecretEntry]:
        query = "SELECT tenant, name, kek_id, created_at, updated_at FROM secrets"
        args: tuple[str, ...] = ()
        if tenant is not None:
            query += " WHERE tenant = ?"
            args = (tenant,)
        rows = self._db.execute(query + " ORDER BY tenant, name", args).fetchall()
        return [
            SecretEntry(tenant=t, name=n, kek_id=k, created_at=c, updated_at=u)
            for t, n, k, c, u in rows
        ]

    def remove(self, tenant: str, name: str) -> bool:
        cur = self._db.execute("DELETE FROM secrets WHERE tenant = ? AND name = ?", (tenant, name))
        return cur.rowcount > 0

    def rotate_kek(self) -> tuple[str, int]:
        """Adds a new primary KEK and re-wraps every data key with it; returns the new
        key's id and how many secrets were re-wrapped."""
        ring = self.keyring
        new_id = ring.add_primary()
        rows = self._db.execute(
            "SELECT tenant, name, kek_id, wrap_nonce, wrapped_dek FROM secrets"
        ).fetchall()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for tenant, name, kek_id, wrap_nonce, wrapped in rows:
                dek = ring.kek(kek_id).decrypt(wrap_nonce, wrapped, _aad(kek_id, tenant, name))
                nonce = os.urandom(12)
                rewrapped = ring.kek(new_id).encrypt(nonce, dek, _aad(new_id, tenant, name))
                self._db.execute(
                    "UPDATE secrets SET kek_id = ?, wrap_nonce = ?, wrapped_dek = ?"
                    " WHERE tenant = ? AND name = ?",
                    (new_id, nonce, rewrapped, tenant, name),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return new_id, len(rows)
