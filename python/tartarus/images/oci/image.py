"""Laying an OCI image down as a root filesystem: layers fetched (concurrently, each
verified and stored in the blob store, shared between templates) and unpacked in order
with whiteouts, through the hardened unpacker."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread

from tartarus.images import digest as digests
from tartarus.images import fsutil
from tartarus.images.blobs import BlobStore
from tartarus.images.errors import BlobNotFoundError
from tartarus.images.oci import layout as oci_layout
from tartarus.images.oci import manifest as m
from tartarus.images.oci.reference import ImageReference
from tartarus.images.oci.registry import RegistryClient
from tartarus.images.progress import Progress, ProgressCallback
from tartarus.images.tar import Readable, TarLimits, open_decompressed
from tartarus.images.unpack import unpack

FETCH_CONCURRENCY = 3
PROGRESS_EVERY = 1 << 20


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that made a task group fail (not the cancellations it caused)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for inner in e.exceptions:
                walk(inner)
        else:
            leaves.append(e)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    return next((e for e in leaves if not isinstance(e, cancelled)), leaves[0])


class ImageSource(Protocol):
    """Where an image's layers come from."""

    description: str
    config: m.ImageConfigFile
    layers: list[m.Descriptor]

    async def fetch(self, layer: m.Descriptor) -> tuple[Path, bool]:
        """A file with the layer's bytes, and whether the caller may move it."""
        ...

    async def close(self) -> None:
        """Removes whatever `fetch` left behind."""
        ...


class RegistrySource:
    def __init__(
        self,
        client: RegistryClient,
        ref: ImageReference,
        manifest: m.Manifest,
        config: m.ImageConfigFile,
        downloads: Path,
    ) -> None:
        self.client = client
        self.ref = ref
        self.description = str(ref)
        self.config = config
        self.layers = manifest.layers
        self.downloads = downloads

    async def close(self) -> None:
        """Keeps partial downloads: the next pull resumes them."""

    async def fetch(self, layer: m.Descriptor) -> tuple[Path, bool]:
        # A stable name per digest: a cut download resumes, even in another process.
        dest = self.downloads / digests.hex_of(layer.digest)
        await self.client.download_blob(self.ref, layer, dest)
        return dest, True


class LayoutSource:
    def __init__(self, path: Path, image: oci_layout.LocalImage) -> None:
        self.path = path
        self.description = f"oci-layout {path}@{image.digest}"
        self.config = image.config
        self.layers = image.layers

    async def fetch(self, layer: m.Descriptor) -> tuple[Path, bool]:
        return oci_layout.layout_blob(self.path, layer.digest), False

    async def close(self) -> None:
        """Nothing to clean: layers are read in place."""


class DockerArchiveSource:
    def __init__(
        self,
        archive: oci_layout.DockerArchive,
        image: oci_layout.LocalImage,
        members: list[str],
        scratch: Path,
    ) -> None:
        self.archive = archive
        self.description = f"docker-archive {archive.path}@{image.digest}"
        self.config = image.config
        self.layers = image.layers
        self._members = dict(zip((d.digest for d in image.layers), members, strict=True))
        self.scratch = scratch

    async def fetch(self, layer: m.Descriptor) -> tuple[Path, bool]:
        dest = self.scratch / digests.hex_of(layer.digest)
        await anyio.Path(self.scratch).mkdir(parents=True, exist_ok=True)
        await anyio.to_thread.run_sync(
            oci_layout.copy_verified, self.archive, self._members[layer.digest], dest, layer.digest
        )
        return dest, True

    async def close(self) -> None:
        await anyio.to_thread.run_sync(fsutil.remove_tree, self.scratch)


class _Counting:
    """Reports how far into a (compressed) layer file the unpacker has read."""

    def __init__(self, f: Readable, report: Callable[[int], None]) -> None:
        self._f = f
        self._report = report
        self._done = 0
        self._reported = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        if self._done - self._reported >= PROGRESS_EVERY or not data:
            self._reported = self._done
            self._report(self._done)
        return data


def unpack_layer(
    path: Path, root: Path, layer: m.Descriptor, limits: TarLimits, progress: ProgressCallback
) -> None:
    def report(done: int) -> None:
        progress(Progress(step="unpack", item=layer.digest, done=done, total=layer.size))

    with path.open("rb") as f:
        stream = open_decompressed(_Counting(f, report), layer.digest)
        unpack(stream, str(root), archive=f"layer {layer.digest}", limits=limits)
    report(layer.size)


async def lay_down(
    source: ImageSource,
    blobs: BlobStore,
    root: Path,
    *,
    owner: str,
    progress: ProgressCallback,
    locks: Path,
    limits: TarLimits | None = None,
) -> list[str]:
    """Stores every layer (held by `owner`) and unpacks them in order into `root`;
    returns the layer digests."""
    limits = limits or TarLimits()
    ready = [anyio.Event() for _ in source.layers]
    slots = anyio.Semaphore(FETCH_CONCURRENCY)

    async def store(i: int, layer: m.Descriptor) -> None:
        # One fetch per layer at a time, whichever image or process wants it.
        async with slots, fsutil.file_lock(locks / f"layer-{digests.hex_of(layer.digest)}.lock"):
            try:
                await blobs.add_refs(
                    owner, [layer.digest]
                )  # stored already, maybe by another image
            except BlobNotFoundError:
                path, movable = await source.fetch(layer)
                await blobs.put_file(
                    path,
                    owner=owner,
                    expected=layer.digest,
                    media_type=layer.media_type,
                    move=movable,
                )
        ready[i].set()

    try:
        async with anyio.create_task_group() as tg:
            for i, layer in enumerate(source.layers):
                tg.start_soon(store, i, layer)
            for i, layer in enumerate(source.layers):
                await ready[i].wait()
                path = await blobs.local_path(layer.digest)
                await anyio.to_thread.run_sync(
                    functools.partial(unpack_layer, path, root, layer, limits, progress)
                )
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    finally:
        with anyio.CancelScope(shield=True):
            await source.close()
    return [layer.digest for layer in source.layers]
