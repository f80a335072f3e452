"""Images on local disk: OCI image layouts (a directory with `oci-layout`, `index.json`
and `blobs/`) and docker-archive tarballs (`docker save`, `skopeo copy ...
docker-archive:`). Every blob read is bounded and checked against its digest."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

import msgspec

from tartarus.images import digest as digests
from tartarus.images.errors import DigestMismatchError, ImageError, ManifestError
from tartarus.images.oci import manifest as m
from tartarus.images.tar import EntryType, TarEntry, TarReader

REF_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_ARCHIVE_MANIFEST = 4 << 20


class LocalImage(msgspec.Struct, frozen=True, kw_only=True):
    """A resolved local image: its identity, config and layers (in order)."""

    digest: str  # manifest digest (layout) or config digest (docker-archive)
    config: m.ImageConfigFile
    layers: list[m.Descriptor]


# -- OCI image layout ------------------------------------------------------------------


def layout_blob(layout: Path, digest: str) -> Path:
    """The file of a blob in a layout; refuses one that resolves outside the layout."""
    path = layout / "blobs" / "sha256" / digests.hex_of(digest)
    real = path.resolve()
    if not real.is_relative_to(layout.resolve()) or not real.is_file():
        raise ImageError(f"{layout}: blob {digest} is missing (or not a file in the layout)")
    return path


def _read_blob(layout: Path, d: m.Descriptor, limit: int) -> bytes:
    if d.size > limit:
        raise ManifestError(f"{layout}: {d.digest} is {d.size} bytes, over the {limit} limit")
    data = layout_blob(layout, d.digest).read_bytes()[: limit + 1]
    hasher = digests.Hasher()
    hasher.update(data)
    hasher.verify(f"{layout}: blob", d.digest, d.size)
    return data


def read_layout(layout: Path, ref: str | None, platform: m.Platform) -> LocalImage:
    marker = layout / "oci-layout"
    if not marker.is_file():
        raise ImageError(f"{layout} is not an OCI image layout (no oci-layout file)")
    index = m.parse_index((layout / "index.json").read_bytes(), f"{layout}/index.json")
    if ref is not None:
        chosen = [d for d in index.manifests if (d.annotations or {}).get(REF_ANNOTATION) == ref]
        if not chosen:
            raise ImageError(f"{layout} has no image named {ref!r} ({_names(index)})")
    elif len(index.manifests) == 1:
        chosen = index.manifests
    else:
        raise ImageError(f"{layout} holds several images; name one with ref ({_names(index)})")
    descriptor = chosen[0]
    for _ in range(3):
        if descriptor.media_type not in m.INDEX_TYPES:
            break
        nested = m.parse_index(_read_blob(layout, descriptor, m.MAX_MANIFEST_BYTES))
        descriptor = m.select_platform(nested, platform)
    manifest = m.parse_manifest(_read_blob(layout, descriptor, m.MAX_MANIFEST_BYTES))
    config = m.parse_config(_read_blob(layout, manifest.config, m.MAX_CONFIG_BYTES))
    return LocalImage(digest=descriptor.digest, config=config, layers=manifest.layers)


def _names(index: m.Index) -> str:
    names = [(d.annotations or {}).get(REF_ANNOTATION, d.digest) for d in index.manifests]
    return "images: " + ", ".join(names)


# -- docker-archive --------------------------------------------------------------------


class _ArchiveManifest(msgspec.Struct, frozen=True, rename="pascal"):
    config: str
    layers: list[str]
    repo_tags: list[str] | None = None


class DockerArchive:
    """Random access to the members of a `docker save` tarball (indexed once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.members: dict[str, TarEntry] = {}
        with path.open("rb") as f:
            reader = TarReader(f, str(path), seek=lambda n: f.seek(n, os.SEEK_CUR))
            for entry in reader:
                self.members[posixpath.normpath(entry.name)] = entry

    def member(self, name: str) -> TarEntry:
        key = posixpath.normpath(name)
        for _ in range(8):  # `docker save` links shared layers to one copy
            entry = self.members.get(key)
            if entry is None:
                raise ImageError(f"{self.path}: no member {name!r}")
            if entry.type is EntryType.FILE:
                return entry
            if entry.type is not EntryType.SYMLINK or entry.linkname.startswith("/"):
                raise ImageError(f"{self.path}: member {name!r} is not a file")
            key = posixpath.normpath(posixpath.join(posixpath.dirname(key), entry.linkname))
        raise ImageError(f"{self.path}: member {name!r} links in a loop")

    def read(self, name: str, limit: int) -> bytes:
        entry = self.member(name)
        if entry.size > limit:
            raise ManifestError(f"{self.path}: {name} is over the {limit} byte limit")
        with self.path.open("rb") as f:
            f.seek(entry.offset)
            return f.read(entry.size)

    def copy(self, name: str, dest: Path) -> str:
        """Copies a member to `dest`; returns its digest."""
        entry = self.member(name)
        hasher = digests.Hasher()
        with self.path.open("rb") as f, dest.open("wb") as out:
            f.seek(entry.offset)
            left = entry.size
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    raise ImageError(f"{self.path}: {name} is truncated")
                hasher.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        return hasher.digest()

    def image(self, ref: str | None) -> tuple[_ArchiveManifest, bytes]:
        """The chosen image's entry in manifest.json and its config bytes."""
        try:
            entries = msgspec.json.decode(
                self.read("manifest.json", MAX_ARCHIVE_MANIFEST), type=list[_ArchiveManifest]
            )
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ManifestError(f"{self.path}: manifest.json: {e}") from e
        if ref is not None:
            wanted = [e for e in entries if ref in (e.repo_tags or [])]
        else:
            wanted = entries if len(entries) == 1 else []
        if not wanted:
            tags = [t for e in entries for t in (e.repo_tags or [])]
            raise ImageError(
                f"{self.path}: {'no image ' + repr(ref) if ref else 'several images'}; "
                f"tags: {', '.join(tags) or 'none'}"
            )
        chosen = wanted[0]
        return chosen, self.read(chosen.config, m.MAX_CONFIG_BYTES)


def read_docker_archive(path: Path, ref: str | None) -> tuple[DockerArchive, LocalImage, list[str]]:
    """The archive, the image (layers described by their diff ids, the digest of the
    uncompressed tar each member holds) and the member names of its layers."""
    if not path.is_file():
        raise ImageError(f"{path}: no such docker-archive file")
    archive = DockerArchive(path)
    entry, config_bytes = archive.image(ref)
    config = m.parse_config(config_bytes, f"{path}: config")
    diff_ids = config.rootfs.diff_ids if config.rootfs else []
    if len(diff_ids) != len(entry.layers):
        raise ManifestError(
            f"{path}: {len(entry.layers)} layers but {len(diff_ids)} diff_ids in the config"
        )
    layers = [
        m.Descriptor(
            media_type=m.OCI_LAYER, digest=digests.parse_digest(d), size=archive.member(n).size
        )
        for d, n in zip(diff_ids, entry.layers, strict=True)
    ]
    image = LocalImage(digest=digests.of_bytes(config_bytes), config=config, layers=layers)
    return archive, image, entry.layers


def copy_verified(archive: DockerArchive, member: str, dest: Path, expected: str) -> None:
    actual = archive.copy(member, dest)
    if actual != expected:
        dest.unlink()
        raise DigestMismatchError(f"{archive.path}: layer {member}", expected, actual)
