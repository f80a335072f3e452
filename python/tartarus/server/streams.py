"""Turns a runtime `Execution` into API shapes: a collected outcome, or a stream of events.

Output is decoded as UTF-8 incrementally per stream, so a character split across two
chunks is not mangled; invalid bytes become U+FFFD.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator

from tartarus.api.types import ExecOutcome, ExitEvent, ExitInfo, OutputEvent, StreamEvent
from tartarus.runtime.base import Execution
from tartarus.runtime.types import ExitStatus, OutputChunk, Stream

# A request/response exec keeps at most this much of each stream (the rest is counted
# and dropped); stream the exec to get everything.
MAX_COLLECTED_OUTPUT = 16 << 20


def exit_info(status: ExitStatus) -> ExitInfo:
    return ExitInfo(
        code=status.code,
        signal=status.signal,
        timed_out=status.timed_out,
        oom_killed=status.oom_killed,
        dropped_chunks=status.dropped_chunks,
        duration_s=status.duration_s,
    )


class Utf8Streams:
    def __init__(self) -> None:
        self._decoders = {
            name: codecs.getincrementaldecoder("utf-8")(errors="replace")
            for name in ("stdout", "stderr")
        }

    def decode(self, stream: Stream, data: bytes) -> str:
        return str(self._decoders[stream].decode(data))

    def flush(self) -> list[tuple[Stream, str]]:
        out: list[tuple[Stream, str]] = []
        for name in ("stdout", "stderr"):
            tail = self._decoders[name].decode(b"", final=True)
            if tail:
                out.append((name, tail))
        return out


async def stream_events(execution: Execution) -> AsyncIterator[StreamEvent]:
    """Output and exit events as the API sends them (no `started`: the caller sends it)."""
    text = Utf8Streams()
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            data = text.decode(event.stream, event.data)
            if data:
                yield OutputEvent(stream=event.stream, data=data)
        else:
            for stream, tail in text.flush():
                yield OutputEvent(stream=stream, data=tail)
            yield ExitEvent(exit=exit_info(event))
            return


async def collect(execution: Execution, limit: int = MAX_COLLECTED_OUTPUT) -> ExecOutcome:
    buffers: dict[Stream, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = False
    status: ExitStatus | None = None
    async for event in execution.events():
        if isinstance(event, OutputChunk):
            buf = buffers[event.stream]
            room = limit - len(buf)
            if room < len(event.data):
                truncated = True
            buf += event.data[: max(room, 0)]
        else:
            status = event
            break
    if status is None:
        raise RuntimeError("the execution ended without an exit status")
    return ExecOutcome(
        pid=status.pid,
        exit_code=status.code,
        signal=status.signal,
        timed_out=status.timed_out,
        oom_killed=status.oom_killed,
        duration_s=status.duration_s,
        stdout=buffers["stdout"].decode(errors="replace"),
        stderr=buffers["stderr"].decode(errors="replace"),
        truncated=truncated or status.dropped_chunks > 0,
    )
