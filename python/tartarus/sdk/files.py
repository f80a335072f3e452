"""`sb.files`: read, write, list and move files inside a sandbox (streamed both ways)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Literal, overload

import anyio
import msgspec

from tartarus.api.sandbox import FileInfo
from tartarus.api.types import FileList, FileWritten, MakeDirBody, RenameBody
from tartarus.sdk.client import Client
from tartarus.sdk.errors import NotFoundError

CHUNK = 256 * 1024


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
