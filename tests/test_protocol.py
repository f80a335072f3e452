"""The Python mirror of the agent protocol: byte-compatible with the Rust side (shared
vectors), round trips, and clear errors for truncated, oversized and malformed frames."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tartarus.runtime import protocol as p
from tests.conftest import REPO_ROOT

VECTORS = REPO_ROOT / "tests" / "vectors" / "protocol"
INDEX: dict[str, Any] = json.loads((VECTORS / "index.json").read_text())
VALID = [v for v in INDEX["vectors"] if "type" in v]
INVALID = [v for v in INDEX["vectors"] if "error" in v]


def test_constants_match_the_rust_side() -> None:
    assert INDEX["protocol_version"] == p.PROTOCOL_VERSION
    assert INDEX["max_frame_bytes"] == p.MAX_FRAME_BYTES


def test_every_message_type_has_a_vector() -> None:
    assert {v["type"] for v in VALID} == p.MESSAGE_TYPES


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vectors_decode_and_reencode_byte_for_byte(vector: dict[str, Any]) -> None:
    data = (VECTORS / vector["file"]).read_bytes()
    envelope = p.decode_frame(data)
    assert envelope.id == vector["id"]
    assert p.type_name(envelope.body) == vector["type"]
    assert p.encode_frame(envelope) == data


def _decode_checked(data: bytes) -> p.Envelope:
    envelope = p.decode_frame(data)
    if isinstance(envelope.body, p.Hello):
        p.check_version(envelope.body.version)
    return envelope


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vectors_give_their_error(vector: dict[str, Any]) -> None:
    data = (VECTORS / vector["file"]).read_bytes()
    with pytest.raises(p.ProtocolError) as info:
        _decode_checked(data)
    assert info.value.kind == vector["error"]
    assert len(str(info.value)) < 400


def test_unknown_message_keeps_its_request_id() -> None:
    data = (VECTORS / "invalid_unknown_type.bin").read_bytes()
    with pytest.raises(p.UnknownMessageError) as info:
        p.decode_frame(data)
    assert (info.value.request_id, info.value.type_name) == (5, "teleport")


def test_oversized_header_is_rejected_before_reading_the_body() -> None:
    with pytest.raises(p.OversizedFrameError, match="exceeds the limit"):
        p.body_length(struct.pack(">I", p.MAX_FRAME_BYTES + 1))
    with pytest.raises(p.OversizedFrameError):
        p.encode_frame(p.Envelope(id=1, body=p.FileData(data=bytes(p.MAX_FRAME_BYTES), size=0)))


# ---- property tests ----

ints = st.integers(min_value=0, max_value=2**32 - 1)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
text = st.text(max_size=40)
blobs = st.binary(max_size=4096)
floats = st.floats(allow_nan=False, allow_infinity=False)

messages = st.one_of(
    st.builds(
        p.Output, pid=ints, stream=st.sampled_from(["stdout", "stderr"]), seq=u64, data=blobs
    ),
    st.builds(
        p.Exec,
        argv=st.none() | st.lists(text, max_size=4),
        shell=st.none() | text,
        env=st.dictionaries(text, text, max_size=4),
        cwd=st.none() | text,
        user=st.none() | text,
        stdin=st.booleans(),
        pty=st.none()
        | st.builds(p.PtySize, rows=st.integers(0, 65535), cols=st.integers(0, 65535)),
        timeout_s=st.none() | floats,
        background=st.booleans(),
        buffer_bytes=st.none() | u64,
    ),
    st.builds(
        p.Exit,
        pid=ints,
        code=st.none() | st.integers(-(2**31), 2**31 - 1),
        signal=st.none() | st.integers(1, 64),
        timed_out=st.booleans(),
        dropped_chunks=u64,
        duration_s=floats,
    ),
    st.builds(p.Error, code=text, message=text),
    st.builds(p.WriteChunk, handle=u64, offset=u64, data=blobs),
    st.builds(p.Logs, since_seq=u64, follow=st.booleans()),
    st.builds(p.Log, seq=u64, ts=floats, pid=ints, stream=st.just("stdout"), data=blobs),
)


@given(rid=u64, body=messages)
def test_round_trip(rid: int, body: p.Message) -> None:
    envelope = p.Envelope(id=rid, body=body)
    assert p.decode_frame(p.encode_frame(envelope)) == envelope


@given(rid=u64, body=messages, cut=st.integers(min_value=0))
def test_any_truncation_is_a_truncated_error(rid: int, body: p.Message, cut: int) -> None:
    frame = p.encode_frame(p.Envelope(id=rid, body=body))
    with pytest.raises(p.TruncatedFrameError):
        p.decode_frame(frame[: cut % len(frame)])


@given(length=st.integers(min_value=p.MAX_FRAME_BYTES + 1, max_value=2**32 - 1))
def test_oversized_lengths_are_rejected(length: int) -> None:
    with pytest.raises(p.OversizedFrameError):
        p.decode_frame(struct.pack(">I", length) + b"\x80")


@given(data=st.binary(max_size=2048))
def test_random_bytes_give_protocol_errors_only(data: bytes) -> None:
    with contextlib.suppress(p.ProtocolError):
        p.decode_frame(data)


@given(
    rid=u64,
    body=messages,
    flips=st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corrupted_bodies_give_protocol_errors_only(
    rid: int, body: p.Message, flips: list[tuple[int, int]]
) -> None:
    frame = bytearray(p.encode_frame(p.Envelope(id=rid, body=body)))
    for at, value in flips:
        frame[p.HEADER_BYTES + at % (len(frame) - p.HEADER_BYTES)] = value
    with contextlib.suppress(p.ProtocolError):
        p.decode_frame(bytes(frame))


def test_python_and_rust_agree_on_struct_shapes() -> None:
    # A message the Rust side never produced still has the Rust field order: the tag,
    # then the fields as declared. Spot-check one with defaults.
    encoded = msgspec.msgpack.encode(p.Exec(argv=["true"]))
    decoded = msgspec.msgpack.decode(encoded)
    assert list(decoded) == [
        "type", "argv", "shell", "env", "cwd", "user", "stdin", "pty", "timeout_s",
        "background", "buffer_bytes",
    ]  # fmt: skip


def test_vectors_dir_is_complete() -> None:
    files = {path.name for path in Path(VECTORS).iterdir()}
    assert files == {v["file"] for v in INDEX["vectors"]} | {"index.json"}
