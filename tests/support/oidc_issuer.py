"""A small OIDC issuer for tests: publishes a discovery document and a JWKS over HTTP.

Run as `python -m tests.support.oidc_issuer DIR`: it listens on a free loopback port,
writes the port to DIR/port, serves DIR/jwks.json (re-read on every request, so a test
rotates keys by rewriting it) and appends each request's path to DIR/requests.log.
Tokens are signed in the test process with the private keys (`Issuer`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

REPO_ROOT = Path(__file__).resolve().parents[2]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _app(directory: Path) -> web.Application:
    async def discovery(request: web.Request) -> web.Response:
        _log(directory, request.path)
        base = f"http://{request.host}"
        return web.json_response({"issuer": base, "jwks_uri": f"{base}/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        _log(directory, request.path)
        return web.Response(
            body=(directory / "jwks.json").read_bytes(), content_type="application/json"
        )

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    return app


def _log(directory: Path, path: str) -> None:
    with (directory / "requests.log").open("a") as f:
        f.write(path + "\n")


async def _serve(directory: Path) -> None:
    runner = web.AppRunner(_app(directory))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    (directory / "port.tmp").write_text(str(port))
    (directory / "port.tmp").replace(directory / "port")
    await asyncio.Event().wait()  # until terminated


class Issuer:
    """The signing side: keys by kid, the published JWKS, and tokens."""

    def __init__(self, directory: Path, url: str) -> None:
        self.directory = directory
        self.url = url
        self.keys: dict[str, tuple[str, PrivateKey]] = {}

    def add_key(self, kid: str, alg: str) -> None:
        key: PrivateKey
        if alg == "RS256":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif alg == "ES256":
            key = ec.generate_private_key(ec.SECP256R1())
        else:
            key = ed25519.Ed25519PrivateKey.generate()
        self.keys[kid] = (alg, key)

    def publish(self, *kids: str) -> None:
        """Writes the JWKS with the public halves of `kids` (all keys if none given)."""
        entries = []
        for kid in kids or tuple(self.keys):
            alg, key = self.keys[kid]
            public = key.public_key()
            jwk: dict[str, Any]
            if isinstance(public, rsa.RSAPublicKey):
                jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
            elif isinstance(public, ec.EllipticCurvePublicKey):
                jwk = ECAlgorithm.to_jwk(public, as_dict=True)
            else:
                jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
            entries.append(jwk | {"kid": kid, "use": "sig", "alg": alg})
        tmp = self.directory / "jwks.tmp"
        tmp.write_text(json.dumps({"keys": entries}))
        tmp.replace(self.directory / "jwks.json")

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "iss": self.url,
            "aud": "tartarus",
            "sub": "alice",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "tenant": "acme",
            "roles": ["developer"],
        }
        base.update(overrides)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, kid: str = "rsa-1", *, alg: str | None = None, **overrides: Any) -> str:
        key_alg, key = self.keys[kid]
        return jwt.encode(
            self.claims(**overrides), key, algorithm=alg or key_alg, headers={"kid": kid}
        )

    def requests(self) -> list[str]:
        log = self.directory / "requests.log"
        return log.read_text().split() if log.exists() else []


@contextmanager
def running_issuer(directory: Path) -> Iterator[Issuer]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "jwks.json").write_text('{"keys": []}')
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.oidc_issuer", str(directory)],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / "port").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the test OIDC issuer did not start")
            time.sleep(0.02)
        port = int((directory / "port").read_text())
        yield Issuer(directory, f"http://127.0.0.1:{port}")
    finally:
        process.terminate()
        process.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(_serve(Path(sys.argv[1])))
