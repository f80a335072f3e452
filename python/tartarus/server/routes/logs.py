"""`/v1/sandboxes/{id}/logs`: a page of the sandbox's log, or `?follow=true` over SSE.

Each SSE event carries the entry's sequence number as its `id`, so a client that
reconnects with `Last-Event-ID` (or `?since=`) resumes right after what it saw.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated

import anyio
import msgspec
from aiohttp import web
from msgspec import Meta

from tartarus.api.types import MAX_SEQ, LogEvent, LogPage
from tartarus.auth.rbac import SANDBOX_READ
from tartarus.runtime.base import SandboxError
from tartarus.runtime.types import LogEntry
from tartarus.server.context import live_sandbox
from tartarus.server.routes.exec import stream_over
from tartarus.server.routing import SSE, Header, Reply, RouteTable, encode, read_query, reply

log = logging.getLogger(__name__)

routes = RouteTable()

# Comment lines keep idle SSE connections (and proxies) from timing out.
SSE_KEEPALIVE_S = 15.0


class LogQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which part of the log.

    since: return entries after this sequence number (0: from the start of what is kept)
    follow: keep the connection open and send new entries as server-sent events
    limit: at most this many entries (without follow)
    """

    since: Annotated[int, Meta(ge=0, le=MAX_SEQ)] = 0
    follow: bool = False
    limit: Annotated[int, Meta(ge=1, le=10000)] = 1000


def log_event(entry: LogEntry) -> LogEvent:
    return LogEvent(
        seq=entry.seq,
        ts=entry.ts,
        pid=entry.pid,
        stream=entry.stream,
        data=entry.data.decode(errors="replace"),
    )


def _resume_from(request: web.Request, since: int) -> int:
    """`Last-Event-ID` (what an SSE client sends on reconnect) moves `since` forward; an
    ID that is not one of our sequence numbers is ignored."""
    last = request.headers.get("Last-Event-ID", "").strip()
    if last.isascii() and last.isdigit() and len(last) <= 18:
        return max(since, int(last))
    return since


@routes.route(
    "GET",
    "/v1/sandboxes/{id}/logs",
    summary="Read or follow a sandbox's log",
    tag="logs",
    query=LogQuery,
    headers=(Header("Last-Event-ID", "With follow: resume after this sequence number"),),
    replies=(
        Reply(
            200,
            LogPage,
            description="A page of entries, or with follow an event stream",
            alternatives=((SSE, LogEvent),),
        ),
    ),
    errors=(404, 409),
    permission=SANDBOX_READ,
)
async def read_logs(request: web.Request) -> web.StreamResponse:
    """Everything the sandbox's processes wrote, in order, with sequence numbers. With
    `follow=true` the answer is `text/event-stream`: one `log` event per entry (its
    `data` a LogEvent document, its `id` the sequence number), until the sandbox stops."""
    q = read_query(request, LogQuery)
    since = _resume_from(request, q.since)
    live = await live_sandbox(request)
    sandbox = live.sandbox
    if not q.follow:
        items: list[LogEvent] = []
        async for entry in sandbox.logs(follow=False, since_seq=since):
            items.append(log_event(entry))
            if len(items) >= q.limit:
                break
        next_seq = items[-1].seq if items else since
        return reply(LogPage(items=items, next_seq=next_seq))

    response = web.StreamResponse(
        headers={"Content-Type": SSE, "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    send, receive = anyio.create_memory_object_stream[LogEntry](256)

    async def pump() -> None:
        async with send:
            try:
                async for entry in sandbox.logs(follow=True, since_seq=since):
                    await send.send(entry)
            except SandboxError as e:
                # The sandbox went away under the follower: the log simply ends.
                log.debug("log follow of %s ended: %s", live.record.id, e)

    with contextlib.suppress(ConnectionError):
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await stream_over(request, live)
                tg.cancel_scope.cancel()

            tg.start_soon(pump)
            tg.start_soon(watch)
            async with receive:
                while True:
                    with anyio.move_on_after(SSE_KEEPALIVE_S) as idle:
                        try:
                            entry = await receive.receive()
                        except anyio.EndOfStream:
                            break
                    if idle.cancelled_caught:
                        await response.write(b": keep-alive\n\n")
                        continue
                    data = encode(log_event(entry))
                    await response.write(b"id: %d\nevent: log\ndata: %s\n\n" % (entry.seq, data))
            tg.cancel_scope.cancel()
        await response.write_eof()
    return response
