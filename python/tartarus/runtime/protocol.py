"""The agent wire protocol, mirrored from the Rust crate `tartarus-proto`.

A frame is a u32 big-endian length followed by that many bytes of MessagePack: an
`Envelope` `{"id": int, "body": {"type": "...", ...}}`. Field names and order match the
Rust types exactly, so both sides produce the same bytes; the shared vectors under
`tests/vectors/protocol/` keep it that way. The specification is `docs/protocol.md`.
"""

from __future__ import annotations

import struct
from typing import Final

import msgspec

from tartarus.errors import TartarusError

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 4 << 20
MAX_CHUNK_BYTES: Final = 1 << 20
HEADER_BYTES: Final = 4
_HEADER = struct.Struct(">I")


class ProtocolError(TartarusError):
    """A frame could not be decoded; `kind` is one of truncated, oversized, malformed,
    unknown_message, version_mismatch."""

    kind = "malformed"


class TruncatedFrameError(ProtocolError):
    kind = "truncated"


class OversizedFrameError(ProtocolError):
    kind = "oversized"


class MalformedFrameError(ProtocolError):
    kind = "malformed"


class UnknownMessageError(ProtocolError):
    kind = "unknown_message"

    def __init__(self, message: str, *, request_id: int | None, type_name: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.type_name = type_name


class VersionMismatchError(ProtocolError):
    kind = "version_mismatch"


class _Msg(msgspec.Struct, tag_field="type"):
    """Base of every message body: tagged by `type`."""


# ---- shared structures ----


class PtySize(msgspec.Struct):
    rows: int
    cols: int


class FileInfo(msgspec.Struct):
    path: str
    name: str
    kind: str
    size: int
    mode: int
    mtime: float


class ExitInfo(msgspec.Struct):
    pid: int
    code: int | None
    signal: int | None
    timed_out: bool
    dropped_chunks: int
    duration_s: float


class ProcessInfo(msgspec.Struct):
    pid: int
    argv: list[str]
    started_at: float
    running: bool
    pty: bool
    background: bool
    exit: ExitInfo | None
    last_seq: int
    evicted_chunks: int


class Stats(msgspec.Struct):
    cpu_seconds: float
    memory_bytes: int
    memory_total_bytes: int
    pids: int
    uptime_s: float


# ---- requests (client -> agent) ----


class Hello(_Msg, tag="hello"):
    version: int
    client: str


class Ping(_Msg, tag="ping"):
    pass


class Exec(_Msg, tag="exec"):
    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    stdin: bool = False
    pty: PtySize | None = None
    timeout_s: float | None = None
    background: bool = False
    buffer_bytes: int | None = None


class WriteStdin(_Msg, tag="write_stdin"):
    pid: int
    data: bytes


class CloseStdin(_Msg, tag="close_stdin"):
    pid: int


class Resize(_Msg, tag="resize"):
    pid: int
    rows: int
    cols: int


class Signal(_Msg, tag="signal"):
    pid: int
    signal: int


class ListProcesses(_Msg, tag="list_processes"):
    pass


class Attach(_Msg, tag="attach"):
    pid: int
    since_seq: int = 0
    follow: bool = True


class Logs(_Msg, tag="logs"):
    since_seq: int = 0
    follow: bool = False


class Cancel(_Msg, tag="cancel"):
    target: int


class ReadFile(_Msg, tag="read_file"):
    path: str
    max_bytes: int | None = None


class WriteFile(_Msg, tag="write_file"):
    path: str
    data: bytes
    mode: int = 0o644
    make_parents: bool = True


class OpenRead(_Msg, tag="open_read"):
    path: str


class ReadChunk(_Msg, tag="read_chunk"):
    handle: int
    offset: int
    length: int


class OpenWrite(_Msg, tag="open_write"):
    path: str
    mode: int = 0o644
    make_parents: bool = True


class WriteChunk(_Msg, tag="write_chunk"):
    handle: int
    offset: int
    data: bytes


class Commit(_Msg, tag="commit"):
    handle: int


class CloseHandle(_Msg, tag="close_handle"):
    handle: int


class ListDir(_Msg, tag="list_dir"):
    path: str
    limit: int | None = None


class Stat(_Msg, tag="stat"):
    path: str


class Mkdir(_Msg, tag="mkdir"):
    path: str
    parents: bool = True
    mode: int = 0o755


class Remove(_Msg, tag="remove"):
    path: str
    recursive: bool = False


class Rename(_Msg, tag="rename"):
    src: str
    dst: str


class WatchDir(_Msg, tag="watch_dir"):
    """Watch a directory (and with `recursive` its subdirectories) with inotify:
    `watching`, then `fs_event`s until cancelled or the directory goes."""

    path: str
    recursive: bool = False


class GetStats(_Msg, tag="get_stats"):
    pass


class Shutdown(_Msg, tag="shutdown"):
    grace_s: float = 10.0


class Reseed(_Msg, tag="reseed"):
    """Mix `entropy` (16-512 bytes) into the guest kernel's RNG and reseed it: sent to
    a guest restored from a snapshot, whose RNG state its clones share."""

    entropy: bytes
    generation: int


# ---- responses and events (agent -> client) ----


class HelloOk(_Msg, tag="hello_ok"):
    version: int
    agent: str
    pid: int
    max_frame: int
    features: list[str]


class Pong(_Msg, tag="pong"):
    pass


class Ok(_Msg, tag="ok"):
    pass


class ShutDown(_Msg, tag="shut_down"):
    """The answer to `shutdown`: processes that exited after their SIGTERM within the
    grace period, and those still running at its end, which were killed."""

    terminated: int
    killed: int


class Error(_Msg, tag="error"):
    code: str
    message: str


class Started(_Msg, tag="started"):
    pid: int
    pty: bool


class Output(_Msg, tag="output"):
    pid: int
    stream: str
    seq: int
    data: bytes


class Exit(ExitInfo, _Msg, tag="exit"):
    pass


class ProcessList(_Msg, tag="process_list"):
    processes: list[ProcessInfo]


class Log(_Msg, tag="log"):
    seq: int
    ts: float
    pid: int
    stream: str
    data: bytes


class End(_Msg, tag="end"):
    pass


class FileData(_Msg, tag="file_data"):
    data: bytes
    size: int


class Opened(_Msg, tag="opened"):
    handle: int
    size: int
    mode: int


class Chunk(_Msg, tag="chunk"):
    data: bytes
    eof: bool


class Committed(_Msg, tag="committed"):
    size: int


class FileInfoMsg(FileInfo, _Msg, tag="file_info"):
    pass


class Watching(_Msg, tag="watching"):
    pass


class FsEvent(_Msg, tag="fs_event"):
    """A change under a watched directory: `kind` is create, write, remove, rename,
    chmod, or overflow (events were lost; `path` is the watched directory)."""

    path: str
    kind: str


class DirListing(_Msg, tag="dir_listing"):
    entries: list[FileInfo]
    truncated: bool


class StatsResult(Stats, _Msg, tag="stats_result"):
    pass


Request = (
    Hello
    | Ping
    | Exec
    | WriteStdin
    | CloseStdin
    | Resize
    | Signal
    | ListProcesses
    | Attach
    | Logs
    | Cancel
    | ReadFile
    | WriteFile
    | OpenRead
    | ReadChunk
    | OpenWrite
    | WriteChunk
    | Commit
    | CloseHandle
    | ListDir
    | Stat
    | Mkdir
    | Remove
    | Rename
    | WatchDir
    | GetStats
    | Shutdown
    | Reseed
)
Response = (
    HelloOk
    | Pong
    | Ok
    | ShutDown
    | Error
    | Started
    | Output
    | Exit
    | ProcessList
    | Log
    | End
    | FileData
    | Opened
    | Chunk
    | Committed
    | FileInfoMsg
    | DirListing
    | StatsResult
    | Watching
    | FsEvent
)
Message = Request | Response

REQUEST_TYPES: Final[tuple[type[_Msg], ...]] = Request.__args__
RESPONSE_TYPES: Final[tuple[type[_Msg], ...]] = Response.__args__


def type_name(message: _Msg) -> str:
    tag = message.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


MESSAGE_TYPES: Final[frozenset[str]] = frozenset(
    str(t.__struct_config__.tag) for t in (*REQUEST_TYPES, *RESPONSE_TYPES)
)


class Envelope(msgspec.Struct):
    id: int
    body: Message


class _RawBody(msgspec.Struct):
    type: str


class _RawEnvelope(msgspec.Struct):
    id: int | None = None
    body: _RawBody | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_raw_decoder = msgspec.msgpack.Decoder(_RawEnvelope)


def encode_frame(envelope: Envelope) -> bytes:
    """One frame: header and body. Raises `OversizedFrameError` above the limit."""
    body = _encoder.encode(envelope)
    if len(body) > MAX_FRAME_BYTES:
        raise OversizedFrameError(
            f"message of {len(body)} bytes exceeds the frame limit of {MAX_FRAME_BYTES} bytes"
        )
    return _HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """Validates a 4-byte header and returns the body length, before anything is read."""
    if len(header) < HEADER_BYTES:
        raise TruncatedFrameError(
            f"truncated frame: expected {HEADER_BYTES} header bytes, got {len(header)}"
        )
    (length,) = _HEADER.unpack_from(header)
    if length > MAX_FRAME_BYTES:
        raise OversizedFrameError(
            f"frame of {length} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes"
        )
    if length == 0:
        raise MalformedFrameError("malformed frame: empty frame")
    return int(length)


def _bounded(text: str, limit: int = 256) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def decode_body(body: bytes) -> Envelope:
    """Decodes a frame body (without its header)."""
    if len(body) > MAX_FRAME_BYTES:
        raise OversizedFrameError(
            f"frame of {len(body)} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes"
        )
    try:
        return _decoder.decode(body)
    # Invalid UTF-8 in a string surfaces as UnicodeDecodeError (a ValueError).
    except (msgspec.DecodeError, ValueError) as exc:
        try:
            raw = _raw_decoder.decode(body)
        except (msgspec.DecodeError, ValueError):
            raw = None
        if raw is not None and raw.body is not None and raw.body.type not in MESSAGE_TYPES:
            name = _bounded(raw.body.type, 64)
            raise UnknownMessageError(
                f"unknown message type {name!r}", request_id=raw.id, type_name=name
            ) from None
        raise MalformedFrameError(f"malformed frame: {_bounded(str(exc))}") from None


def decode_frame(data: bytes) -> Envelope:
    """Decodes exactly one complete frame (header + body, nothing after it)."""
    length = body_length(data[:HEADER_BYTES])
    got = len(data) - HEADER_BYTES
    if got < length:
        raise TruncatedFrameError(f"truncated frame: expected {length} bytes, got {got}")
    if got > length:
        raise MalformedFrameError(
            f"malformed frame: {got - length} bytes after the end of the frame"
        )
    return decode_body(data[HEADER_BYTES:])


def check_version(theirs: int) -> None:
    if theirs != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version mismatch: this side speaks {PROTOCOL_VERSION}, the peer {theirs}"
        )
