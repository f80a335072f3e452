"""A client of the OCI distribution API (the Docker registry v2 protocol) on aiohttp.

Pull: manifest and index negotiation (OCI and Docker media types), platform selection,
digest verification of every manifest, config and layer, layers streamed to disk and
resumed with HTTP Range after a cut (`download.download`). Auth: anonymous, Basic, and
the bearer-token flow (a 401 names a token realm; the token is fetched for the
repository's scope, cached until it expires, and never logged). Redirects to blob
storage are followed without our Authorization header. Push (blobs, then manifests)
serves tests and image export.

Loopback registries (localhost, 127.0.0.0/8, ::1) are spoken to over plain HTTP; every
other registry over HTTPS.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
from yarl import URL

from tartarus.images import digest as digests
from tartarus.images import download
from tartarus.images.errors import DigestMismatchError, ManifestError, RegistryError
from tartarus.images.oci import manifest as m
from tartarus.images.oci.auth import (
    Challenge,
    Credentials,
    docker_config_credentials,
    is_loopback,
    parse_challenge,
)
from tartarus.images.oci.reference import ImageReference
from tartarus.images.progress import ProgressCallback, ignore

MAX_TOKEN_BYTES = 1 << 20
MAX_ERROR_BYTES = 4096
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)


class _Token(msgspec.Struct):
    token: str | None = None
    access_token: str | None = None
    expires_in: int = 60


class PulledManifest(msgspec.Struct, frozen=True, kw_only=True):
    """An image manifest for one platform, with the digest it was verified against."""

    reference: ImageReference
    digest: str
    manifest: m.Manifest
    raw: bytes
    media_type: str


class RegistryClient:
    """One client per session; holds tokens per (registry, scope)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        credentials: Mapping[str, Credentials] | None = None,
        progress: ProgressCallback = ignore,
    ) -> None:
        self.session = session
        self._credentials = dict(credentials or {})
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic: set[str] = set()
        self.progress = progress

    # -- transport ---------------------------------------------------------------------

    @staticmethod
    def base_url(ref: ImageReference) -> URL:
        scheme = "http" if is_loopback(ref.api_host) else "https"
        return URL(f"{scheme}://{ref.api_host}")

    def _credentials_for(self, registry: str) -> Credentials | None:
        return self._credentials.get(registry) or docker_config_credentials(registry)

    def _auth_header(self, ref: ImageReference, scope: str) -> str | None:
        token = self._tokens.get((ref.registry, scope))
        if token and token[1] > time.monotonic():
            return f"Bearer {token[0]}"
        if ref.registry in self._basic:
            creds = self._credentials_for(ref.registry)
            return creds.basic() if creds else None
        return None

    async def _authenticate(self, ref: ImageReference, scope: str, header: str) -> None:
        challenge = parse_challenge(header) if header else Challenge("", {})
        creds = self._credentials_for(ref.registry)
        if challenge.scheme == "basic":
            if creds is None:
                raise RegistryError(
                    f"{ref.registry} requires a login; add it to ~/.docker/config.json "
                    "(docker login / skopeo login)"
                )
            self._basic.add(ref.registry)
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryError(f"{ref.registry}: unsupported authentication {header!r}")
        realm = URL(challenge.params["realm"])
        if realm.scheme not in ("http", "https"):
            raise RegistryError(f"{ref.registry}: token realm {realm} is not HTTP(S)")
        if creds and realm.scheme == "http" and not is_loopback(realm.host or ""):
            raise RegistryError(
                f"{ref.registry}: refusing to send credentials to a plain-HTTP token realm"
            )
        query = {"scope": scope}
        if "service" in challenge.params:
            query["service"] = challenge.params["service"]
        headers = {"Authorization": creds.basic()} if creds else {}
        async with self.session.get(realm.update_query(query), headers=headers) as resp:
            body = await download.read_bounded(resp, MAX_TOKEN_BYTES, f"token from {realm}")
            if resp.status != 200:
                raise RegistryError(
                    f"{ref.registry}: the token service {realm} answered HTTP {resp.status}"
                    + (" (wrong credentials?)" if creds else " (does it need a login?)")
                )
        try:
            token = msgspec.json.decode(body, type=_Token)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise RegistryError(f"{ref.registry}: malformed token response: {e}") from e
        value = token.token or token.access_token
        if not value:
            raise RegistryError(f"{ref.registry}: the token service returned no token")
        # Renew a little early; never trust a lifetime under a few seconds.
        lifetime = max(token.expires_in, 10) - 5
        self._tokens[(ref.registry, scope)] = (value, time.monotonic() + lifetime)

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        ref: ImageReference,
        path_or_url: str | URL,
        *,
        push: bool = False,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], Any] | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One API request with auth (retried once after a challenge) and redirects."""
        scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        url = (
            path_or_url
            if isinstance(path_or_url, URL)
            else self.base_url(ref).join(URL(path_or_url))
        )
        for attempt in range(2):
            sent = dict(headers or {})
            auth = self._auth_header(ref, scope)
            if auth:
                sent["Authorization"] = auth
            resp = await self.session.request(
                method,
                url,
                headers=sent,
                data=body() if body else None,
                allow_redirects=False,
            )
            if resp.status == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                await self._authenticate(ref, scope, challenge)
                continue
            hops = 0
            while resp.status in _REDIRECTS and method in ("GET", "HEAD"):
                hops += 1
                if hops > MAX_REDIRECTS:
                    resp.release()
                    raise RegistryError(f"too many redirects from {url}")
                target = resp.url.join(URL(resp.headers.get("Location", "")))
                resp.release()
                if target.host != url.host or target.port != url.port:
                    # Blob storage elsewhere gets a signed URL, not our credentials.
                    sent.pop("Authorization", None)
                resp = await self.session.request(
                    method, target, headers=sent, allow_redirects=False
                )
            try:
                yield resp
            finally:
                resp.release()
            return
        raise AssertionError("unreachable")

    @staticmethod
    async def _fail(resp: aiohttp.ClientResponse, what: str) -> RegistryError:
        text = (await resp.content.read(MAX_ERROR_BYTES)).decode("utf-8", "replace").strip()
        hint = " (not found)" if resp.status == 404 else ""
        return RegistryError(
            f"{what}: {resp.method} {resp.url} answered HTTP {resp.status}{hint}: {text}"
        )

    # -- pull --------------------------------------------------------------------------

    async def get_manifest(self, ref: ImageReference, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, verified when asked by
        digest and against the registry's Docker-Content-Digest header."""
        path = f"/v2/{ref.repository}/manifests/{reference}"
        async with self.request("GET", ref, path, headers={"Accept": m.ACCEPT}) as resp:
            if resp.status != 200:
                raise await self._fail(resp, f"manifest {ref.name}:{reference}")
            body = await download.read_bounded(
                resp, m.MAX_MANIFEST_BYTES, f"manifest {ref.name}:{reference}"
            )
            header_digest = resp.headers.get("Docker-Content-Digest")
            content_type = resp.headers.get("Content-Type")
        actual = digests.of_bytes(body)
        if reference.startswith("sha256:") and actual != reference:
            raise DigestMismatchError(f"manifest {ref.name}", reference, actual)
        if header_digest and header_digest.startswith("sha256:") and header_digest != actual:
            raise DigestMismatchError(f"manifest {ref.name}:{reference}", header_digest, actual)
        return body, m.media_type_of(body, content_type), actual

    async def resolve(self, ref: ImageReference, platform: m.Platform) -> PulledManifest:
        """The image manifest for `platform` (through an index if the reference names one)."""
        body, media_type, digest = await self.get_manifest(ref, ref.reference)
        for _ in range(2):  # an index may point at an index, once
            if media_type not in m.INDEX_TYPES:
                break
            chosen = m.select_platform(m.parse_index(body, f"index of {ref}"), platform)
            body, media_type, digest = await self.get_manifest(ref, chosen.digest)
            if digest != chosen.digest:
                raise DigestMismatchError(f"manifest of {ref}", chosen.digest, digest)
        if media_type not in m.MANIFEST_TYPES:
            raise ManifestError(f"{ref}: unsupported manifest media type {media_type!r}")
        manifest = m.parse_manifest(body, f"manifest of {ref}")
        return PulledManifest(
            reference=ref.with_digest(digest) if not ref.digest else ref,
            digest=digest,
            manifest=manifest,
            raw=body,
            media_type=media_type,
        )

    async def get_config(self, ref: ImageReference, descriptor: m.Descriptor) -> bytes:
        path = f"/v2/{ref.repository}/blobs/{descriptor.digest}"
        async with self.request("GET", ref, path) as resp:
            if resp.status != 200:
                raise await self._fail(resp, f"config of {ref}")
            body = await download.read_bounded(resp, m.MAX_CONFIG_BYTES, f"config of {ref}")
        hasher = digests.Hasher()
        hasher.update(body)
        hasher.verify(f"config of {ref}", descriptor.digest, descriptor.size)
        return body

    async def download_blob(
        self, ref: ImageReference, descriptor: m.Descriptor, dest: Path
    ) -> None:
        """Streams a blob to `dest`, resuming `<dest>.partial`, verified."""
        path = f"/v2/{ref.repository}/blobs/{descriptor.digest}"

        def open_get(
            headers: Mapping[str, str],
        ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
            return self.request("GET", ref, path, headers=headers)

        await download.download(
            open_get,
            dest,
            what=descriptor.digest,
            digest=descriptor.digest,
            size=descriptor.size,
            progress=self.progress,
        )

    # -- push --------------------------------------------------------------------------

    async def push_blob(self, ref: ImageReference, path: Path, digest: str) -> None:
        """Uploads a blob unless the registry has it (monolithic upload)."""
        blob = f"/v2/{ref.repository}/blobs/{digest}"
        async with self.request("HEAD", ref, blob, push=True) as resp:
            if resp.status == 200:
                return
        async with self.request(
            "POST", ref, f"/v2/{ref.repository}/blobs/uploads/", push=True
        ) as resp:
            if resp.status != 202:
                raise await self._fail(resp, f"upload of {digest} to {ref.name}")
            location = self.base_url(ref).join(URL(resp.headers["Location"]))
        target = location.update_query({**location.query, "digest": digest})
        size = (await anyio.Path(path).stat()).st_size

        def body() -> Any:
            return path.open("rb")

        async with self.request(
            "PUT",
            ref,
            target,
            push=True,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body,
        ) as resp:
            if resp.status != 201:
                raise await self._fail(resp, f"upload of {digest} to {ref.name}")

    async def push_manifest(self, ref: ImageReference, body: bytes, media_type: str) -> str:
        """Uploads a manifest under the reference's tag (or digest); returns its digest."""
        digest = digests.of_bytes(body)
        path = f"/v2/{ref.repository}/manifests/{ref.tag or digest}"
        async with self.request(
            "PUT", ref, path, push=True, headers={"Content-Type": media_type}, body=lambda: body
        ) as resp:
            if resp.status != 201:
                raise await self._fail(resp, f"manifest push to {ref}")
        return digest
