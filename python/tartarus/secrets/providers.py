"""The secret provider interface, the `env:` and `file:` providers, and the resolver.

A reference is `provider:name`. `local:` and `vault:` names are looked up in the
tenant's own namespace, so one tenant can never name another's secret; `env:` and
`file:` read the server's own environment and files (the security policy lets only
operators use them unless it says otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import anyio

from tartarus.errors import TartarusError
from tartarus.secrets.redaction import register

MAX_SECRET_BYTES = 64 * 1024


class SecretError(TartarusError):
    """A secret could not be resolved; the message names the reference, never a value."""


class SecretProvider(Protocol):
    scheme: str

    async def resolve(self, tenant: str, name: str) -> str: ...


class EnvProvider:
    scheme = "env"

    async def resolve(self, tenant: str, name: str) -> str:
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"secret env:{name}: the server has no such environment variable")
        return value


class FileProvider:
    scheme = "file"

    async def resolve(self, tenant: str, name: str) -> str:
        path = Path(name)
        if not path.is_absolute():
            raise SecretError(f"secret file:{name}: the path must be absolute")
        try:
            async with await anyio.open_file(path, "rb") as f:
                data = await f.read(MAX_SECRET_BYTES + 1)
        except OSError as e:
            raise SecretError(f"secret file:{name}: {e.strerror}") from None
        if len(data) > MAX_SECRET_BYTES:
            raise SecretError(f"secret file:{name}: larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise SecretError(f"secret file:{name}: not UTF-8 text") from None
        return text.removesuffix("\n")


class SecretResolver:
    def __init__(self, providers: list[SecretProvider]) -> None:
        self._providers = {p.scheme: p for p in providers}

    @property
    def schemes(self) -> list[str]:
        return sorted(self._providers)

    async def resolve(self, tenant: str, ref: str) -> str:
        scheme, sep, name = ref.partition(":")
        provider = self._providers.get(scheme)
        if not sep or not name or provider is None:
            raise SecretError(
                f"secret reference {ref!r}: unknown provider; use one of "
                + ", ".join(f"{s}:NAME" for s in self.schemes)
            )
        value = await provider.resolve(tenant, name)
        register(value)
        return value

    async def environment(self, tenant: str, refs: dict[str, str]) -> dict[str, str]:
        """Environment variable → value for every reference."""
        return {env: await self.resolve(tenant, ref) for env, ref in sorted(refs.items())}
