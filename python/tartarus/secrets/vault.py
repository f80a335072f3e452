"""HashiCorp Vault KV version 2 over HTTP.

`vault:PATH#FIELD` reads `GET <address>/v1/<mount>/data/<path_prefix><PATH>` with the
server's token and returns `data.data[FIELD]` (FIELD defaults to `value`). The tenant's
name is part of the path prefix, so a tenant can only name its own secrets. Vault is
not installed on our build hosts; the tests run this provider against a minimal KV v2
endpoint written for them (tests/test_secrets.py), which speaks the same requests and
answers as Vault's documented API.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from tartarus.auth.tokens import is_secure_url
from tartarus.secrets.providers import MAX_SECRET_BYTES, SecretError
from tartarus.secrets.redaction import register
from tartarus.secrets.settings import VaultSettings

_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,255}$")
MAX_RESPONSE_BYTES = 1 << 20


class VaultProvider:
    scheme = "vault"

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._address = settings.address.rstrip("/")
        if not is_secure_url(self._address):
            raise SecretError(
                f"the Vault address {self._address!r} must use https (http only on loopback)"
            )
        self._session: aiohttp.ClientSession | None = None

    def _token(self) -> str:
        if self.settings.token_file is not None:
            try:
                token = self.settings.token_file.read_text().strip()
            except OSError as e:
                raise SecretError(f"cannot read the Vault token file: {e.strerror}") from None
        else:
            token = os.environ.get("VAULT_TOKEN", "")
        if not token:
            raise SecretError("no Vault token: set [secrets.vault] token_file or VAULT_TOKEN")
        register(token)
        return token

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def resolve(self, tenant: str, name: str) -> str:
        path, _, field = name.partition("#")
        field = field or "value"
        if not _PATH.match(path) or ".." in path.split("/"):
            raise SecretError(f"secret vault:{name}: not a valid path")
        prefix = self.settings.path_prefix.replace("{tenant}", tenant)
        url = (
            f"{self._address}/v1/{quote(self.settings.mount)}/data/{quote(prefix + path, safe='/')}"
        )
        headers = {"X-Vault-Token": self._token()}
        if self.settings.namespace:
            headers["X-Vault-Namespace"] = self.settings.namespace
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            )
        try:
            async with self._session.get(url, headers=headers) as response:
                raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise SecretError(f"secret vault:{name}: Vault is unreachable ({e})") from None
        if status == 404:
            raise SecretError(f"secret vault:{name}: no such secret in Vault")
        if status in (401, 403):
            raise SecretError(f"secret vault:{name}: Vault refused the server's token")
        if status != 200 or len(raw) > MAX_RESPONSE_BYTES:
            raise SecretError(f"secret vault:{name}: Vault answered HTTP {status}")
        try:
            body: Any = msgspec.json.decode(raw)
            data = body["data"]["data"]
        except (msgspec.DecodeError, KeyError, TypeError):
            raise SecretError(f"secret vault:{name}: not a KV version 2 answer") from None
        if not isinstance(data, dict) or field not in data:
            raise SecretError(f"secret vault:{name}: the secret has no field {field!r}")
        value = data[field]
        if not isinstance(value, str) or len(value.encode()) > MAX_SECRET_BYTES:
            raise SecretError(f"secret vault:{name}: field {field!r} is not text of a sane size")
        return value
