"""Verified, resumable downloads to disk.

A download streams into `<dest>.partial`; if that file exists (an earlier attempt or
an earlier process was cut off) it resumes with an HTTP Range request and verifies the
digest over the whole file. Only a verified file is renamed to `dest`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import anyio
import anyio.to_thread

from tartarus.images import digest as digests
from tartarus.images import fsutil
from tartarus.images.errors import ImageError
from tartarus.images.progress import Progress, ProgressCallback

CHUNK = 1 << 20
ATTEMPTS = 4

Opener = Callable[[Mapping[str, str]], AbstractAsyncContextManager[aiohttp.ClientResponse]]


def _rehash(path: Path) -> digests.Hasher:
    hasher = digests.Hasher()
    if not path.exists():
        return hasher
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher


async def download(
    open_get: Opener,
    dest: Path,
    *,
    what: str,
    digest: str,
    size: int | None,
    progress: ProgressCallback,
    step: str = "download",
) -> None:
    """Fetches into `dest` the content named by `digest` (and `size`, if known).
    `open_get(headers)` opens the GET (it adds auth and follows redirects)."""
    # Two processes must not append to the same partial file.
    async with fsutil.file_lock(dest.with_name(dest.name + ".lock")):
        await _download(
            open_get, dest, what=what, digest=digest, size=size, progress=progress, step=step
        )


async def _download(
    open_get: Opener,
    dest: Path,
    *,
    what: str,
    digest: str,
    size: int | None,
    progress: ProgressCallback,
    step: str,
) -> None:
    if await anyio.Path(dest).exists():
        return
    partial = dest.with_name(dest.name + ".partial")
    await anyio.Path(partial.parent).mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for _ in range(ATTEMPTS):
        hasher = await anyio.to_thread.run_sync(_rehash, partial)
        if size is not None and hasher.size > size:
            await anyio.Path(partial).unlink()
            hasher = digests.Hasher()
        resumed = hasher.size > 0
        try:
            hasher = await _attempt(
                open_get, partial, hasher, what=what, size=size, progress=progress, step=step
            )
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            last_error = e  # resume from what reached the disk
            continue
        try:
            hasher.verify(what, digest, size)
        except ImageError as e:
            await anyio.Path(partial).unlink()
            if not resumed:
                raise
            last_error = e  # a stale or corrupt partial file: start over
            continue
        await anyio.Path(partial).rename(dest)
        return
    raise ImageError(f"{what}: download failed after {ATTEMPTS} attempts: {last_error}")


async def _attempt(
    open_get: Opener,
    partial: Path,
    hasher: digests.Hasher,
    *,
    what: str,
    size: int | None,
    progress: ProgressCallback,
    step: str,
) -> digests.Hasher:
    """One GET, resuming after `hasher.size` bytes; returns the hasher of the file."""
    offset = hasher.size
    if size is not None and offset == size:
        return hasher
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    async with open_get(headers) as resp:
        append = resp.status == 206 and offset > 0
        if resp.status == 200:
            hasher = digests.Hasher()
        elif not append:
            body = (await resp.content.read(512)).decode("utf-8", "replace")
            raise ImageError(f"{what}: GET {resp.url} answered HTTP {resp.status}: {body}")
        total = size
        if total is None and resp.content_length is not None:
            total = hasher.size + resp.content_length
        async with await anyio.open_file(partial, "ab" if append else "wb") as out:
            async for chunk in resp.content.iter_chunked(CHUNK):
                hasher.update(chunk)
                if size is not None and hasher.size > size:
                    raise ImageError(f"{what}: server sent more than the expected {size} bytes")
                await out.write(chunk)
                progress(Progress(step=step, item=what, done=hasher.size, total=total))
    return hasher


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of `resp`, refusing more than `limit` bytes."""
    chunks = []
    total = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        total += len(chunk)
        if total > limit:
            raise ImageError(f"{what}: response larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
