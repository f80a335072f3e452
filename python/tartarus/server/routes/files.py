"""`/v1/sandboxes/{id}/files`: stream files in and out, list, stat, mkdir, rename, remove.

Paths are paths inside the sandbox. The server refuses relative paths and `..`
components before a backend sees them; the backend (the agent inside the sandbox)
resolves what is left within the sandbox's own root.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.types import (
    FileList,
    FileWatchEvent,
    FileWritten,
    MakeDirBody,
    RenameBody,
    SandboxPath,
)
from tartarus.auth.rbac import SANDBOX_EXEC, SANDBOX_READ
from tartarus.runtime.types import FileInfo
from tartarus.server.context import live_sandbox
from tartarus.server.problems import ApiError
from tartarus.server.routes.exec import stream_over
from tartarus.server.routing import (
    NDJSON,
    OCTETS,
    Reply,
    RouteTable,
    encode,
    read_json,
    read_query,
    reply,
)

routes = RouteTable()

# Uploads larger than this are refused (413) and leave nothing behind.
MAX_UPLOAD_BYTES = 4 << 30
UPLOAD_CHUNK = 256 * 1024


def sandbox_path(path: str) -> str:
    """Checks and normalises a path inside the sandbox (400 for traversal)."""
    if not path.startswith("/") or "\x00" in path:
        raise ApiError(400, "invalid-path", f"{path!r}: paths must be absolute, without NUL")
    if ".." in path.split("/"):
        raise ApiError(400, "path-traversal", f"{path!r}: '..' is not allowed in a path")
    return posixpath.normpath(path).replace("//", "/")


class PathQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The file or directory.

    path: absolute path inside the sandbox
    """

    path: SandboxPath


class WriteQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where to write.

    path: absolute path inside the sandbox (parent directories must exist)
    mode: permission bits of a new file (e.g. 420 for 0644)
    """

    path: SandboxPath
    mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o644


class RemoveQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to remove.

    path: absolute path inside the sandbox
    recursive: remove a directory and everything in it
    """

    path: SandboxPath
    recursive: bool = False


class WatchQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What to watch.

    path: absolute path of a directory inside the sandbox
    recursive: its subdirectories too (those made later included)
    """

    path: SandboxPath
    recursive: bool = False


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/files/watch",
    summary="Watch a directory",
    tag="files",
    query=WatchQuery,
    replies=(Reply(200, FileWatchEvent, media=NDJSON, description="NDJSON events"),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def watch_directory(request: web.Request) -> web.StreamResponse:
    """Answers once the watch is in place (inotify in the sandbox's agent), then sends
    one JSON document per line for each change: `create`, `write`, `remove`, `rename`,
    `chmod`, or `overflow` when the sandbox's kernel dropped events. It ends when the
    client goes, the directory is removed, or the sandbox stops."""
    q = read_query(request, WatchQuery)
    live = await live_sandbox(request)
    watch = await live.sandbox.watch_dir(sandbox_path(q.path), recursive=q.recursive)
    try:
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
        await response.prepare(request)
        async with anyio.create_task_group() as tg:

            async def until_gone() -> None:
                await stream_over(request, live)
                tg.cancel_scope.cancel()

            tg.start_soon(until_gone)
            async for change in watch.changes():
                event = FileWatchEvent(path=change.path, kind=change.kind)  # type: ignore[arg-type]
                await response.write(encode(event) + b"\n")
            tg.cancel_scope.cancel()
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
    except ConnectionError:
        pass
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await watch.close()
    return response


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/files",
    summary="Download a file",
    tag="files",
    query=PathQuery,
    replies=(Reply(200, media=OCTETS, description="The file's bytes"),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def download_file(request: web.Request) -> web.StreamResponse:
    """Streams the file's content as it is read, whatever its size."""
    path = sandbox_path(read_query(request, PathQuery).path)
    chunks = (await live_sandbox(request)).sandbox.download(path)
    # Read the first chunk before answering, so a missing file is a 404, not a cut stream.
    first = await anext(aiter(chunks), b"")
    response = web.StreamResponse(headers={"Content-Type": OCTETS})
    await response.prepare(request)
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


async def _bounded(request: web.Request) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise ApiError(
                413, "body-too-large", f"uploads may be at most {MAX_UPLOAD_BYTES} bytes"
            )
        yield chunk


@routes.route(
    "PUT",
    "/v1/sandboxes/{id}/files",
    summary="Upload a file",
    tag="files",
    query=WriteQuery,
    body_media=OCTETS,
    body_required=False,
    replies=(Reply(201, FileWritten),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def upload_file(request: web.Request) -> web.StreamResponse:
    """Streams the body into the file, replacing it atomically: readers see the old
    content or the new one, never a mix, and a failed upload leaves the old one."""
    q = read_query(request, WriteQuery)
    path = sandbox_path(q.path)
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        raise ApiError(413, "body-too-large", f"uploads may be at most {MAX_UPLOAD_BYTES} bytes")
    written = await (await live_sandbox(request)).sandbox.upload(
        path, _bounded(request), mode=q.mode
    )
    return reply(FileWritten(path=path, size=written), status=201)


@routes.route(
    "DELETE",
    "/v1/sandboxes/{id}/files",
    summary="Remove a file or directory",
    tag="files",
    query=RemoveQuery,
    replies=(Reply(204, description="Removed"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def remove_file(request: web.Request) -> web.StreamResponse:
    q = read_query(request, RemoveQuery)
    path = sandbox_path(q.path)
    if path == "/":
        raise ApiError(409, "refused", "refusing to remove the sandbox's root directory")
    await (await live_sandbox(request)).sandbox.remove(path, recursive=q.recursive)
    return web.Response(status=204)


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/files/list",
    summary="List a directory",
    tag="files",
    query=PathQuery,
    replies=(Reply(200, FileList),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def list_files(request: web.Request) -> web.StreamResponse:
    path = sandbox_path(read_query(request, PathQuery).path)
    return reply(FileList(items=await (await live_sandbox(request)).sandbox.list_dir(path)))


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/files/stat",
    summary="Describe a file",
    tag="files",
    query=PathQuery,
    replies=(Reply(200, FileInfo),),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def stat_file(request: web.Request) -> web.StreamResponse:
    path = sandbox_path(read_query(request, PathQuery).path)
    return reply(await (await live_sandbox(request)).sandbox.stat(path))


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/files/mkdir",
    summary="Make a directory",
    tag="files",
    body=MakeDirBody,
    replies=(Reply(204, description="Made (or already there)"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def make_dir(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, MakeDirBody)
    await (await live_sandbox(request)).sandbox.make_dir(
        sandbox_path(body.path), parents=body.parents
    )
    return web.Response(status=204)


@routes.route(
    "POST",
    "/v1/sandboxes/{id}/files/rename",
    summary="Rename or move a file",
    tag="files",
    body=RenameBody,
    replies=(Reply(204, description="Renamed"),),
    errors=(404, 409),
    permission=SANDBOX_EXEC,
)
async def rename_file(request: web.Request) -> web.StreamResponse:
    body = await read_json(request, RenameBody)
    await (await live_sandbox(request)).sandbox.rename(
        sandbox_path(body.src), sandbox_path(body.dst)
    )
    return web.Response(status=204)
