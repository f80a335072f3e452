"""`sb.files`: read, write, list and move files inside a sandbox (streamed both ways)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Literal, overload

import anyio
import msgspec

from tartarus.api.sandbox import FileInfo
from tartarus.api.types import FileList, FileWatchEvent, FileWritten, MakeDirBody, RenameBody
from tartarus.errors import TartarusError
from tartarus.sdk.client import Client, NdjsonStream
from tartarus.sdk.commands import Callback, call_back
from tartarus.sdk.errors import NotFoundError

CHUNK = 256 * 1024
_watch_events = msgspec.json.Decoder(FileWatchEvent)


class WatchHandle:
    """A directory watch whose events go to a callback in the background
    (`sb.files.watch_dir`); `stop()` ends it."""

    def __init__(
        self,
        stream: NdjsonStream[FileWatchEvent],
        on_event: Callback[FileWatchEvent],
        on_exit: Callback[Exception | None] | None,
    ) -> None:
        self._stream = stream
        # A task of the caller's event loop (asyncio): the events arrive while the
        # caller does other things, as E2B's handle has them.
        self._task = asyncio.get_running_loop().create_task(self._pump(on_event, on_exit))

    async def _pump(
        self, on_event: Callback[FileWatchEvent], on_exit: Callback[Exception | None] | None
    ) -> None:
        error: Exception | None = None
        try:
            async for event in self._stream:
                await call_back(on_event, event)
        except (TartarusError, OSError, ValueError) as e:
            error = e
        finally:
            self._stream.close()
        await call_back(on_exit, error)

    async def stop(self) -> None:
        """Ends the watch (the server cancels it in the sandbox)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._stream.close()


class Files:
    def __init__(self, client: Client, sandbox_id: str) -> None:
        self._client = client
        self._base = f"/v1/sandboxes/{sandbox_id}/files"

    @overload
    async def read(self, path: str, *, format: Literal["text"] = "text") -> str: ...

    @overload
    async def read(self, path: str, *, format: Literal["bytes"]) -> bytes: ...

    async def read(self, path: str, *, format: Literal["text", "bytes"] = "text") -> str | bytes:
        """The whole file, as text (UTF-8) or bytes; `stream()` for large files."""
        data = b"".join([chunk async for chunk in self.stream(path)])
        return data.decode() if format == "text" else data

    async def _open_watch(self, path: str, recursive: bool) -> NdjsonStream[FileWatchEvent]:
        params = {"path": path, "recursive": recursive}
        return await self._client.open_ndjson(
            "GET", f"{self._base}/watch", _watch_events, params=params
        )

    @contextlib.asynccontextmanager
    async def watch(
        self, path: str, *, recursive: bool = False
    ) -> AsyncIterator[AsyncIterator[FileWatchEvent]]:
        """Watches a directory (inotify in the sandbox): on entry the watch is in
        place; iterate for changes (`create`, `write`, `remove`, `rename`, `chmod`,
        `overflow`) until you leave the block or the directory is removed."""
        stream = await self._open_watch(path, recursive)
        try:
            yield aiter(stream)
        finally:
            stream.close()

    async def watch_dir(
        self,
        path: str,
        on_event: Callback[FileWatchEvent],
        *,
        recursive: bool = False,
        on_exit: Callback[Exception | None] | None = None,
    ) -> WatchHandle:
        """E2B's shape of `watch`: returns once the watch is in place; `on_event` gets
        each change in the background (asyncio), `on_exit` the error that ended it (or
        None); `await handle.stop()` ends it."""
        stream = await self._open_watch(path, recursive)
        return WatchHandle(stream, on_event, on_exit)

    def stream(self, path: str) -> AsyncIterator[bytes]:
        """The file's content, chunk by chunk, as the server reads it."""
        return self._client.download(self._base, {"path": path}, CHUNK)

    async def write(
        self, path: str, data: str | bytes | AsyncIterable[bytes], *, mode: int = 0o644
    ) -> FileWritten:
        """Replaces the file atomically with `data` (text is written as UTF-8)."""
        body = data.encode() if isinstance(data, str) else data
        response = await self._client.upload(self._base, {"path": path, "mode": mode}, body)
        async with response:
            raw = await response.read()
        return msgspec.json.decode(raw, type=FileWritten)

    async def upload(self, local: Path | str, path: str, *, mode: int | None = None) -> FileWritten:
        """Copies a local file into the sandbox without holding it in memory."""
        local = Path(local)
        file_mode = mode if mode is not None else local.stat().st_mode & 0o7777

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(local, "rb") as f:
                while chunk := await f.read(CHUNK):
                    yield chunk

        return await self.write(path, chunks(), mode=file_mode)

    async def download(self, path: str, local: Path | str) -> int:
        """Copies a sandbox file to `local` (written to a temporary name, then renamed)."""
        local = Path(local)
        tmp = local.with_name(f".{local.name}.part")
        size = 0
        try:
            async with await anyio.open_file(tmp, "wb") as f:
                async for chunk in self.stream(path):
                    await f.write(chunk)
                    size += len(chunk)
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    async def list(self, path: str = "/") -> list[FileInfo]:
        return (
            await self._client.call("GET", f"{self._base}/list", FileList, params={"path": path})
        ).items

    async def get_info(self, path: str) -> FileInfo:
        return await self._client.call("GET", f"{self._base}/stat", FileInfo, params={"path": path})

    async def exists(self, path: str) -> bool:
        try:
            await self.get_info(path)
        except NotFoundError:
            return False
        return True

    async def remove(self, path: str, *, recursive: bool = True) -> None:
        """Removes a file, or a directory with everything in it."""
        await self._client.call("DELETE", self._base, params={"path": path, "recursive": recursive})

    async def rename(self, old_path: str, new_path: str) -> FileInfo:
        await self._client.call(
            "POST", f"{self._base}/rename", json=RenameBody(src=old_path, dst=new_path)
        )
        return await self.get_info(new_path)

    async def make_dir(self, path: str) -> bool:
        """Creates the directory and its parents; False if it already existed."""
        if await self.exists(path):
            return False
        await self._client.call("POST", f"{self._base}/mkdir", json=MakeDirBody(path=path))
        return True
