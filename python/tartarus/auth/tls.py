"""TLS for the API server's TCP listener, with client certificates for node agents.

The server presents `tls.cert`/`tls.key`; with `tls.client_ca` it asks for a client
certificate (optional: API clients may use bearer tokens instead) and trusts those the
CA signed; the certificate's common name is the agent's identity. Rotation without a
restart: every handshake checks the files' modification times and, when they changed,
builds a fresh context and switches the connection to it (in the SNI callback, which
OpenSSL calls for every ClientHello); connections already open keep their session.
A half-written set of files is skipped (the previous context stays) until it loads.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from tartarus.auth.settings import TlsSettings
from tartarus.errors import ConfigError

log = logging.getLogger(__name__)


def _build(settings: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.cert, settings.key)
    if settings.client_ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.load_verify_locations(cafile=settings.client_ca)
    return ctx


def _stamp(settings: TlsSettings) -> tuple[float, ...]:
    files = [settings.cert, settings.key, *([settings.client_ca] if settings.client_ca else [])]
    return tuple(Path(f).stat().st_mtime_ns for f in files)


class ReloadingTls:
    """The server's SSL context, renewed when its files change."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        try:
            self._stamp = _stamp(settings)
            self._current = _build(settings)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the TLS certificate or key: {e}") from e
        self.context = _build(settings)
        self.context.sni_callback = self._on_hello
        self.reloads = 0

    def current(self) -> ssl.SSLContext:
        try:
            stamp = _stamp(self.settings)
        except OSError:
            return self._current
        if stamp != self._stamp:
            try:
                fresh = _build(self.settings)
            except (OSError, ssl.SSLError) as e:
                log.warning("keeping the previous TLS certificates: the new ones fail: %s", e)
            else:
                self._current, self._stamp = fresh, stamp
                self.reloads += 1
                log.info("TLS certificates reloaded from %s", self.settings.cert)
        return self._current

    def _on_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self.current()


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """For node agents (and tests): trust the CA, present a client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx
