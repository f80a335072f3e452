"""Where a Tartarus server listens, as a URL: `unix:/path/to.sock` or `http://host:port`.

`TARTARUS_URL` names the server the SDK and CLI talk to; without it they use the local
server's socket in the runtime dir (starting that server if needed).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import msgspec

from tartarus.errors import ConfigError

if TYPE_CHECKING:
    # Only named: the configuration loads every component's settings, the SDK none.
    from tartarus.config import Settings

SOCKET_NAME = "tartarus.sock"


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["unix", "tcp"]
    path: str | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False

    @classmethod
    def unix(cls, path: Path) -> Endpoint:
        return cls(kind="unix", path=str(path))

    @classmethod
    def tcp(cls, host: str, port: int, *, tls: bool = False) -> Endpoint:
        return cls(kind="tcp", host=host, port=port, tls=tls)

    @property
    def url(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = self.host or "127.0.0.1"
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The base URL of HTTP requests (a unix socket's requests name a dummy host)."""
        return "http://localhost" if self.kind == "unix" else self.url

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        if url.startswith("unix:"):
            path = url.removeprefix("unix:")
            path = "/" + path.lstrip("/") if path.startswith("//") else path
            if not path.startswith("/"):
                raise ConfigError(f"TARTARUS_URL {url!r}: a unix socket path must be absolute")
            return cls.unix(Path(path))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"TARTARUS_URL {url!r}: use unix:/path/to.sock, http://HOST:PORT or https://..."
            )
        tls = parts.scheme == "https"
        return cls.tcp(parts.hostname, parts.port or (443 if tls else 80), tls=tls)


def default_socket_path(settings: Settings) -> Path:
    return settings.runtime_dir / SOCKET_NAME
