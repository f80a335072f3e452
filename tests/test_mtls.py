"""mTLS between node agents and the API server: `tartarus certs`, agents identified by
their certificate, bearer tokens beside it, and rotation of the server certificate and
the client CA without a restart."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tartarus.auth.tls import client_context
from tests.support.auth import make_key
from tests.support.server import Server, running_server, server_env

pytestmark = pytest.mark.timeout(120)


def certs(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def https(
    server: Server, ctx: ssl.SSLContext, path: str, token: str | None = None
) -> tuple[int, Any, x509.Certificate]:
    assert server.tcp_url is not None and server.tcp_url.startswith("https://")
    host, port = server.tcp_url.removeprefix("https://").rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        assert isinstance(conn.sock, ssl.SSLSocket)
        der = conn.sock.getpeercert(binary_form=True)
        assert der is not None
        return response.status, json.loads(response.read()), x509.load_der_x509_certificate(der)
    finally:
        conn.close()


def test_agents_by_certificate_and_rotation_without_restart(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    certs("init", "--dir", str(pki), "--server-name", "127.0.0.1", "--agent", "node-1")
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (pki / "agents" / "node-1.key").stat().st_mode & 0o777 == 0o600
    config = tmp_path / "tartarus.toml"
    config.write_text(
        f'[auth.tls]\ncert = "{pki}/server.pem"\nkey = "{pki}/server.key"\n'
        f'client_ca = "{pki}/ca.pem"\n'
    )
    env = server_env(tmp_path / "srv", TARTARUS_CONFIG=str(config))
    with running_server(tmp_path / "srv", env=env) as server:
        agent = client_context(pki / "ca.pem", pki / "agents/node-1.pem", pki / "agents/node-1.key")
        status, me, first_cert = https(server, agent, "/v1/auth/whoami")
        assert status == 200
        assert me["subject"] == "agent:node-1" and me["method"] == "certificate"
        assert me["roles"] == ["node-agent"] and me["permissions"] == ["node:agent"]
        # An agent may not act on sandboxes.
        assert https(server, agent, "/v1/sandboxes")[0] == 403
        # Without a certificate: a bearer key, or nothing at all (refused).
        anonymous = client_context(pki / "ca.pem")
        assert https(server, anonymous, "/v1/health")[0] == 401
        _, key = make_key(server, "acme", ["viewer"])
        assert https(server, anonymous, "/v1/sandboxes", key)[0] == 200
        # A certificate from another CA does not even get through the handshake.
        certs("init", "--dir", str(tmp_path / "rogue"), "--agent", "node-1")
        rogue = client_context(
            pki / "ca.pem",
            tmp_path / "rogue/agents/node-1.pem",
            tmp_path / "rogue/agents/node-1.key",
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https(server, rogue, "/v1/auth/whoami")

        # Rotate the server certificate: the running server presents the new one.
        certs("issue", "--dir", str(pki), "--server-name", "127.0.0.1")
        _, _, second_cert = https(server, agent, "/v1/auth/whoami")
        assert second_cert.serial_number != first_cert.serial_number

        # Rotate the client CA: agents of the new CA get in, the old CA's do not.
        certs(
            "init",
            "--dir",
            str(tmp_path / "pki2"),
            "--server-name",
            "127.0.0.1",
            "--agent",
            "node-2",
        )
        shutil.copy(tmp_path / "pki2/ca.pem", pki / "ca.pem.new")
        (pki / "ca.pem.new").replace(pki / "ca.pem")
        fresh = client_context(
            pki / "server.pem",
            tmp_path / "pki2/agents/node-2.pem",
            tmp_path / "pki2/agents/node-2.key",
        )
        status, me, _ = https(server, fresh, "/v1/auth/whoami")
        assert status == 200 and me["subject"] == "agent:node-2"
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https(server, agent, "/v1/auth/whoami")
        assert server.process.poll() is None  # one process throughout
        assert "TLS certificates reloaded" in server.log()


def test_half_written_certificates_keep_the_old_ones(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    certs("init", "--dir", str(pki), "--server-name", "127.0.0.1")
    config = tmp_path / "tartarus.toml"
    config.write_text(f'[auth.tls]\ncert = "{pki}/server.pem"\nkey = "{pki}/server.key"\n')
    env = server_env(tmp_path / "srv", TARTARUS_CONFIG=str(config), TARTARUS_API_KEY="k-123456")
    with running_server(tmp_path / "srv", env=env) as server:
        ctx = client_context(pki / "ca.pem")
        assert https(server, ctx, "/v1/health", "k-123456")[0] == 200
        (pki / "server.pem").write_text("-----BEGIN CERTIFICATE-----\ntruncated")
        assert https(server, ctx, "/v1/health", "k-123456")[0] == 200
        assert "keeping the previous TLS certificates" in server.log()


def test_certs_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    certs("init", "--dir", str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "tartarus", "certs", "init", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1 and "already holds a CA" in out.stderr
