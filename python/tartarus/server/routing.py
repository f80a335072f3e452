"""The route table: each handler is registered with the types it reads and writes.

The same records drive aiohttp's router and the OpenAPI document, and the helpers
here (`read_json`, `read_query`, `reply`) are the only way handlers decode and encode,
so what the document says is what the handlers do.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from tartarus.codec import dec_hook, enc_hook
from tartarus.server.problems import ApiError, validation_problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
S = TypeVar("S", bound=msgspec.Struct)

JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
OCTETS = "application/octet-stream"

# Bodies larger than this are refused with 413 before they are parsed.
MAX_JSON_BODY = 2 << 20

_encoder = msgspec.json.Encoder(enc_hook=enc_hook)


@dataclass(frozen=True)
class Reply:
    """One documented response: status, body type (a Struct, or None), media type."""

    status: int
    body: Any = None
    media: str = JSON
    description: str = ""
    # Other media types the same status may carry (media, item type), e.g. SSE.
    alternatives: tuple[tuple[str, Any], ...] = ()
    # Path parameters this reply's body supplies, as JSON pointers into it (`{"id":
    # "/id"}`): the document links it to every operation that takes them (OpenAPI links).
    provides: tuple[tuple[str, str], ...] = ()


# What a reply carrying a SandboxInfo supplies to the operations on that sandbox.
SANDBOX_ID = (("id", "/id"),)


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    handler: Handler
    body: Any = None
    body_media: str = JSON
    body_required: bool = True
    query: type[msgspec.Struct] | None = None
    replies: tuple[Reply, ...] = ()
    errors: tuple[int, ...] = ()
    headers: tuple[Header, ...] = ()
    websocket: bool = False
    # What the caller must be allowed (`tartarus.auth.rbac`); the server refuses to
    # start with a route that has none.
    permission: str | None = None
    # The handler writes its own audit entry (the access middleware writes none).
    audits_itself: bool = False

    @property
    def path_params(self) -> list[str]:
        return _PATH_PARAM.findall(self.path)

    @property
    def document_path(self) -> str:
        """The path as OpenAPI writes it: `{path:.*}` (aiohttp's pattern) is `{path}`."""
        return _PATH_PARAM.sub(r"{\1}", self.path)


# `{name}`, or `{name:regex}` (a parameter that may hold slashes).
_PATH_PARAM = re.compile(r"\{(\w+)(?::[^{}]*)?\}")


@dataclass
class RouteTable:
    operations: list[Operation] = field(default_factory=list)

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        tag: str,
        replies: tuple[Reply, ...],
        body: Any = None,
        body_media: str = JSON,
        body_required: bool = True,
        query: type[msgspec.Struct] | None = None,
        errors: tuple[int, ...] = (),
        headers: tuple[Header, ...] = (),
        websocket: bool = False,
        permission: str | None = None,
        audits_itself: bool = False,
    ) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.operations.append(
                Operation(
                    method=method,
                    path=path,
                    operation_id=handler.__name__,
                    summary=summary,
                    tag=tag,
                    handler=handler,
                    body=body,
                    body_media=body_media,
                    body_required=body_required,
                    query=query,
                    replies=replies,
                    errors=errors,
                    headers=headers,
                    websocket=websocket,
                    permission=permission,
                    audits_itself=audits_itself,
                )
            )
            return handler

        return register

    def install(self, app: web.Application) -> None:
        for op in self.operations:
            app.router.add_route(op.method, op.path, op.handler, name=op.operation_id)


async def read_json(request: web.Request, type_: type[S]) -> S:
    """Decodes a bounded JSON body into `type_`: 413 if too large, 400 if not JSON,
    422 if it does not match the type."""
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise ApiError(413, "body-too-large", f"the body may be at most {MAX_JSON_BODY} bytes")
    raw = await read_bounded(request, MAX_JSON_BODY)
    if not raw.strip():
        raw = b"{}"
    return decode_json(raw, type_, "body")


def _integral(value: Any) -> Any:
    """3.0 is an integer in JSON Schema: make it one, so strict decoding accepts it where
    an int is wanted (and still refuses "3", 0 for a bool, and so on)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def decode_json(raw: bytes | str, type_: type[S], where: str) -> S:
    """Strict decoding into `type_`: 400 if not JSON, 422 (naming the field) if it does
    not match."""
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise ApiError(400, "malformed-json", f"the {where} is not valid JSON: {e}") from e
    try:
        return msgspec.convert(_integral(value), type_, strict=True, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        raise validation_problem(e, where) from e


async def read_bounded(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body-too-large", f"the body may be at most {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _is_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _is_list(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp))
    return origin is list


def read_query(request: web.Request, type_: type[S]) -> S:
    """Decodes the query string into `type_` (strings converted to the field types)."""
    hints = typing.get_type_hints(type_, include_extras=True)
    known = {f.encode_name: f for f in msgspec.structs.fields(type_)}
    raw: dict[str, Any] = {}
    for key in request.query:
        spec = known.get(key)
        if spec is None:
            raise ApiError(
                422, "invalid-query", f"unknown query parameter {key!r}; known: {sorted(known)}"
            )
        values = request.query.getall(key)
        raw[key] = values if _is_list(hints[spec.name]) else values[-1]
    try:
        return msgspec.convert(raw, type_, strict=False, dec_hook=dec_hook)
    except msgspec.ValidationError as e:
        raise validation_problem(e, "query") from e


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def reply(value: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(value), content_type=JSON, headers=headers
    )
