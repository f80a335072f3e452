"""A real OCI registry for tests: Debian's `docker-registry` on a random loopback port
with its config and storage in a tmp dir, optionally behind bearer-token auth served
by a small token service (JWTs signed with a throwaway key via the openssl CLI), and
helpers that build images in Python and push them with our client."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import anyio
import zstandard
from aiohttp import web

from tartarus.images import digest as digests
from tartarus.images.oci import manifest as m
from tartarus.images.oci.reference import parse_reference
from tartarus.images.oci.registry import RegistryClient
from tests.conftest import require_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TokenAuth:
    """Key material and settings for the registry's token auth."""

    key: Path
    cert: Path
    realm: str
    service: str = "tartarus-test-registry"
    issuer: str = "tartarus-test-issuer"
    username: str = "tester"
    password: str = field(default_factory=lambda: secrets.token_hex(8))
    issued: int = 0

    def jwt(self, scope: str) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.username,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        self.issued += 1
        return f"{signing_input}.{b64(signature)}"


def make_token_auth(directory: Path, realm: str) -> TokenAuth:
    require_binary("openssl")
    key, cert = directory / "token.key", directory / "token.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=tartarus-test-token", "-keyout", str(key), "-out", str(cert),
        ],
        capture_output=True,
        check=True,
    )  # fmt: skip
    return TokenAuth(key=key, cert=cert, realm=realm)


@contextlib.asynccontextmanager
async def token_service(directory: Path) -> AsyncIterator[TokenAuth]:
    """Serves `GET /token?scope=...` to clients presenting the test credentials."""
    port = free_port()
    auth = make_token_auth(directory, f"http://127.0.0.1:{port}/token")

    async def token(request: web.Request) -> web.Response:
        expected = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return web.json_response({"error": "login required"}, status=401)
        return web.json_response(
            {"token": auth.jwt(request.query.get("scope", "")), "expires_in": 300}
        )

    app = web.Application()
    app.router.add_get("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield auth
    finally:
        await runner.cleanup()


@dataclass
class Registry:
    host: str
    storage: Path
    process: subprocess.Popen[bytes]

    def blob_data(self, digest: str) -> Path:
        hex_ = digests.hex_of(digest)
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"


def _config(storage: Path, port: int, auth: TokenAuth | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog: {disabled: true}",
        "storage:",
        f"  filesystem: {{rootdirectory: {storage}}}",
        "  delete: {enabled: true}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
    ]
    if auth is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {auth.realm}",
            f"    service: {auth.service}",
            f"    issuer: {auth.issuer}",
            f"    rootcertbundle: {auth.cert}",
        ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def local_registry(directory: Path, auth: TokenAuth | None = None) -> Iterator[Registry]:
    """Starts `docker-registry serve` on a free loopback port; stops it afterwards."""
    binary = require_binary("docker-registry")
    directory.mkdir(parents=True, exist_ok=True)
    storage = directory / "storage"
    for _ in range(5):
        port = free_port()
        config = directory / "registry.yml"
        config.write_text(_config(storage, port, auth))
        log = (directory / "registry.log").open("ab")
        proc = subprocess.Popen(
            [binary, "serve", str(config)], stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        if _wait_ready(port, proc):
            break
        _stop(proc)
    else:
        raise RuntimeError(
            f"docker-registry did not start: {(directory / 'registry.log').read_text()}"
        )
    try:
        yield Registry(host=f"127.0.0.1:{port}", storage=storage, process=proc)
    finally:
        _stop(proc)


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
        except urllib.error.HTTPError:
            return True  # 401 from an auth-enabled registry: it is up
        except OSError:
            time.sleep(0.05)
        else:
            return True
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


# -- images built by the tests ---------------------------------------------------------


@dataclass
class BuiltImage:
    manifest: bytes
    config: bytes
    layers: list[bytes]  # gzip-compressed layer tars

    @property
    def digest(self) -> str:
        return digests.of_bytes(self.manifest)

    def layer_digests(self) -> list[str]:
        return [digests.of_bytes(layer) for layer in self.layers]


def make_image(
    layer_tars: list[bytes],
    *,
    env: list[str] | None = None,
    cmd: list[str] | None = None,
    zstd: bool = False,
) -> BuiltImage:
    if zstd:
        layers = [zstandard.ZstdCompressor().compress(t) for t in layer_tars]
    else:
        layers = [gzip.compress(t, compresslevel=1, mtime=0) for t in layer_tars]
    layer_type = m.OCI_LAYER_ZSTD if zstd else m.OCI_LAYER_GZIP
    config = json.dumps(
        {
            "architecture": m.host_platform_default().architecture,
            "os": "linux",
            "config": {"Env": env or ["PATH=/bin"], "Cmd": cmd or ["/bin/sh"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [digests.of_bytes(t) for t in layer_tars]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": m.OCI_MANIFEST,
            "config": {
                "mediaType": m.OCI_CONFIG,
                "digest": digests.of_bytes(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer_type, "digest": digests.of_bytes(b), "size": len(b)}
                for b in layers
            ],
        }
    ).encode()
    return BuiltImage(manifest=manifest, config=config, layers=layers)


async def push_image(
    session: aiohttp.ClientSession, reference: str, image: BuiltImage, workdir: Path
) -> str:
    """Pushes blobs then the manifest with our client; returns the manifest digest."""
    client = RegistryClient(session)
    ref = parse_reference(reference)
    await anyio.Path(workdir).mkdir(parents=True, exist_ok=True)
    for blob in [image.config, *image.layers]:
        path = workdir / digests.hex_of(digests.of_bytes(blob))
        await anyio.Path(path).write_bytes(blob)
        await client.push_blob(ref, path, digests.of_bytes(blob))
    return await client.push_manifest(ref, image.manifest, m.OCI_MANIFEST)


def write_layout(directory: Path, image: BuiltImage, ref: str) -> None:
    """The same image as an OCI image layout."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for blob in [image.manifest, image.config, *image.layers]:
        (blobs / digests.hex_of(digests.of_bytes(blob))).write_bytes(blob)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": m.OCI_MANIFEST,
                "digest": image.digest,
                "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
