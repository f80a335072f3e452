"""`tartarus certs`: a small CA for mTLS between node agents and API servers.

`init` makes a CA (ECDSA P-256, ten years) and, from it, a server certificate (its DNS
names and IP addresses as SANs, `serverAuth`) and agent certificates (`clientAuth`,
the agent's name as the subject's common name: that name is the agent's identity).
`issue` makes more from the same CA, which is also how certificates are rotated:
issue a new one, replace the files, and the server picks them up on the next
handshake without a restart. Keys are written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tartarus.errors import TartarusError

CA_DAYS = 3650
SERVER_DAYS = 365
AGENT_DAYS = 90
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class CertError(TartarusError):
    pass


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tartarus"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600 if private else 0o644
    )
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    tmp.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, directory: Path, name: str = "Tartarus CA") -> CertificateAuthority:
        if (directory / "ca.key").exists():
            raise CertError(f"{directory} already holds a CA (ca.key); use `tartarus certs issue`")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(directory / "ca.key", _key_pem(key), private=True)
        _write(directory / "ca.pem", _cert_pem(cert), private=False)
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
            cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except (OSError, ValueError) as e:
            raise CertError(f"cannot load the CA in {directory}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{directory}/ca.key is not an ECDSA key")
        return cls(key, cert)

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        common_name: str,
        days: int,
        server_names: list[str] | None = None,
        client: bool = False,
    ) -> x509.Certificate:
        """Writes `<stem>.pem` (certificate + CA chain) and `<stem>.key`."""
        if not NAME.match(common_name):
            raise CertError(f"{common_name!r} is not a valid name (letters, digits, . _ -)")
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server_names:
            sans: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    sans.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        _write(directory / f"{stem}.key", _key_pem(key), private=True)
        _write(directory / f"{stem}.pem", _cert_pem(cert) + _cert_pem(self.cert), private=False)
        return cert

    def issue_server(
        self, directory: Path, names: list[str], days: int = SERVER_DAYS
    ) -> x509.Certificate:
        return self.issue(directory, "server", common_name=names[0], days=days, server_names=names)

    def issue_agent(self, directory: Path, name: str, days: int = AGENT_DAYS) -> x509.Certificate:
        return self.issue(directory / "agents", name, common_name=name, days=days, client=True)
