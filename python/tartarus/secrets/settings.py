"""The `[secrets]` section of `tartarus.toml`."""

from __future__ import annotations

from pathlib import Path

import msgspec


class VaultSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A HashiCorp Vault KV version 2 secrets engine."""

    address: str
    mount: str = "secret"
    # Each tenant's secrets live under this path; `{tenant}` is replaced.
    path_prefix: str = "tartarus/{tenant}/"
    # The token: read from this file, else from the VAULT_TOKEN environment variable.
    token_file: Path | None = None
    # Vault Enterprise namespace (X-Vault-Namespace), if any.
    namespace: str | None = None
    timeout_s: float = 10.0


class SecretsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # The key-encryption key file of the local store (default STATE_DIR/secrets.key).
    key_file: Path | None = None
    vault: VaultSettings | None = None
