"""How a node agent proves who it is to the API servers: the fleet's token as a bearer
token, or a client certificate (mTLS) signed by the API servers' `[auth.tls] client_ca`.

With a certificate the agent sends no bearer token (the API servers then know it only
as `agent:<common name>`, which may act for that node and nothing else), and it trusts
the API servers' certificates through `ca`. The files are read again when they change,
so `tartarus certs issue --agent NAME` renews an agent's certificate without a restart.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import msgspec
from cryptography import x509
from cryptography.x509.oid import NameOID

from tartarus.auth.tls import client_context
from tartarus.errors import ConfigError


class JoinCredentials(msgspec.Struct, frozen=True, kw_only=True):
    # The fleet's token (the API servers' TARTARUS_API_KEY); empty with a certificate.
    token: str = ""
    # The CA that signed the API servers' certificates (https:// join URLs).
    ca: Path | None = None
    # This agent's client certificate (chain) and key, from `tartarus certs`.
    cert: Path | None = None
    key: Path | None = None

    def check(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs both --cert and --key")
        if self.cert is not None and self.ca is None:
            raise ConfigError("--cert needs --ca (the CA of the API servers' certificates)")
        if not self.token and self.cert is None:
            raise ConfigError(
                "a node agent needs the fleet's token (--token or TARTARUS_JOIN_TOKEN) "
                "or a client certificate (--cert, --key, --ca)"
            )

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key) if p is not None]

    def certificate_name(self) -> str | None:
        """The common name of the client certificate: the node's name in the fleet."""
        if self.cert is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the client certificate {self.cert}: {e}") from e
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise ConfigError(f"the client certificate {self.cert} names no common name")
        return str(names[0].value)

    def headers(self) -> dict[str, str]:
        """A certificate speaks for the agent; a bearer token beside it would win."""
        if self.cert is not None or not self.token:
            return {}
        return {"Authorization": f"Bearer {self.token}"}


class ClientTls:
    """The agent's SSL context, built again when its files change."""

    def __init__(self, credentials: JoinCredentials) -> None:
        self.credentials = credentials
        self._stamp: tuple[int, ...] = ()
        self._context: ssl.SSLContext | None = None

    def _stamps(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self.credentials.files)

    def hint(self) -> str:
        """Why a connection may have failed: with TLS 1.3 an API server that refuses a
        client certificate just closes the connection, so the agent says what it can."""
        c = self.credentials
        if c.cert is None:
            return ""
        try:
            cert = x509.load_pem_x509_certificate(c.cert.read_bytes())
        except (OSError, ValueError) as e:
            return f" (the client certificate {c.cert} cannot be read: {e})"
        now = dt.datetime.now(dt.UTC)
        if cert.not_valid_after_utc < now:
            return (
                f" (the client certificate {c.cert} expired at {cert.not_valid_after_utc:%F %T}"
                " UTC: renew it with `tartarus certs issue --agent NAME`)"
            )
        if cert.not_valid_before_utc > now:
            start = cert.not_valid_before_utc
            return f" (the client certificate {c.cert} is not valid before {start:%F %T} UTC)"
        return (
            f" (if the API server closes the connection, check that its client_ca signed "
            f"the client certificate {c.cert})"
        )

    def changed(self) -> bool:
        """Whether the files changed since the context was built (False if unreadable)."""
        try:
            return self._context is not None and self._stamps() != self._stamp
        except OSError:
            return False

    def context(self) -> ssl.SSLContext | None:
        """None without a CA (plain http, or the system's trust store)."""
        c = self.credentials
        if c.ca is None:
            return None
        try:
            self._stamp = self._stamps()
            self._context = client_context(c.ca, c.cert, c.key)
        except (OSError, ssl.SSLError) as e:
            if self._context is None:
                raise ConfigError(f"cannot load the agent's TLS files: {e}") from e
            # A half-written renewal: keep the last good context until the files change.
        return self._context
