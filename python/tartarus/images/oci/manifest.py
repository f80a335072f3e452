"""OCI and Docker v2 manifests, indexes and image configs: msgspec Structs with the
field names of the specs, lenient about unknown fields, strict about what is used;
plus platform selection."""

from __future__ import annotations

import platform as host_platform
from typing import TypeVar

import msgspec

from tartarus.images import digest as digests
from tartarus.images.errors import ManifestError

MAX_MANIFEST_BYTES = 4 << 20  # the distribution spec's limit
MAX_CONFIG_BYTES = 8 << 20

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
LAYER_TYPES = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER)
# What a client accepts, in preference order.
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


class Platform(msgspec.Struct, frozen=True, kw_only=True, rename={"os_version": "os.version"}):
    architecture: str
    os: str
    os_version: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


class Descriptor(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    media_type: str
    digest: str
    size: int
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    platform: Platform | None = None


class Manifest(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    schema_version: int
    media_type: str | None = None
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str] | None = None


class Index(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    schema_version: int
    media_type: str | None = None
    manifests: list[Descriptor]
    annotations: dict[str, str] | None = None


class ContainerConfig(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    env: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str | None = None
    user: str | None = None


class RootFS(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    diff_ids: list[str]


class ImageConfigFile(msgspec.Struct, frozen=True, kw_only=True):
    architecture: str | None = None
    os: str | None = None
    config: ContainerConfig | None = None
    rootfs: RootFS | None = None


def host_platform_default() -> Platform:
    machine = host_platform.machine()
    arch = _ARCH.get(machine, machine)
    return Platform(os="linux", architecture=arch, variant="v8" if arch == "arm64" else None)


def parse_platform(text: str | None) -> Platform:
    """`os/arch[/variant]` (e.g. `linux/arm64/v8`); None means this host's."""
    if text is None:
        return host_platform_default()
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ManifestError(f"platform {text!r} is not os/arch[/variant]")
    return Platform(
        os=parts[0], architecture=parts[1], variant=parts[2] if len(parts) == 3 else None
    )


S = TypeVar("S", bound=msgspec.Struct)


def _decode(data: bytes, type_: type[S], what: str, limit: int) -> S:
    if len(data) > limit:
        raise ManifestError(f"{what}: {len(data)} bytes is over the {limit} byte limit")
    try:
        return msgspec.json.decode(data, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ManifestError(f"{what}: not a valid {type_.__name__.lower()}: {e}") from e


def media_type_of(data: bytes, header: str | None) -> str:
    """A manifest's media type: its own `mediaType` field, else the HTTP header, else
    by shape (OCI allows the field to be absent)."""
    try:
        probe = msgspec.json.decode(data, type=dict[str, object])
    except msgspec.DecodeError as e:
        raise ManifestError(f"manifest is not JSON: {e}") from e
    declared = probe.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if header and header.split(";")[0].strip() in (*INDEX_TYPES, *MANIFEST_TYPES):
        return header.split(";")[0].strip()
    if "manifests" in probe:
        return OCI_INDEX
    if "layers" in probe:
        return OCI_MANIFEST
    raise ManifestError("document is neither an image manifest nor an index")


def parse_index(data: bytes, what: str = "index") -> Index:
    index = _decode(data, Index, what, MAX_MANIFEST_BYTES)
    for d in index.manifests:
        digests.parse_digest(d.digest)
    return index


def parse_manifest(data: bytes, what: str = "manifest") -> Manifest:
    manifest = _decode(data, Manifest, what, MAX_MANIFEST_BYTES)
    if manifest.schema_version != 2:
        raise ManifestError(f"{what}: schemaVersion {manifest.schema_version}, expected 2")
    for d in (manifest.config, *manifest.layers):
        digests.parse_digest(d.digest)
        if d.size < 0:
            raise ManifestError(f"{what}: negative size for {d.digest}")
    for layer in manifest.layers:
        if layer.media_type == DOCKER_FOREIGN_LAYER or layer.urls:
            raise ManifestError(f"{what}: foreign (non-distributable) layers are not supported")
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"{what}: unsupported layer media type {layer.media_type!r}")
    return manifest


def parse_config(data: bytes, what: str = "image config") -> ImageConfigFile:
    return _decode(data, ImageConfigFile, what, MAX_CONFIG_BYTES)


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The manifest for `wanted` in an index: exact variant first, then any variant."""
    candidates = [
        d
        for d in index.manifests
        if d.platform is not None
        and d.platform.os == wanted.os
        and d.platform.architecture == wanted.architecture
        and d.media_type in (*MANIFEST_TYPES, *INDEX_TYPES)
    ]
    for d in candidates:
        if d.platform is not None and d.platform.variant == wanted.variant:
            return d
    if candidates:
        return candidates[0]
    offered = ", ".join(str(d.platform) for d in index.manifests if d.platform) or "none"
    raise ManifestError(f"no image for {wanted} in the index (it offers: {offered})")


def env_dict(env: list[str] | None) -> dict[str, str]:
    out = {}
    for item in env or []:
        key, _, value = item.partition("=")
        if key:
            out[key] = value
    return out
