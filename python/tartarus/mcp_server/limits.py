"""Per-client limits of the MCP server: how fast, how many at once, how many sandboxes.

A client is one caller: the stdio server's single user, or one principal of the HTTP
server (every token of it). The API's own policy (quotas, rates) still applies behind
these; these stop one agent from using all of what its key may do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from tartarus.errors import TartarusError


class ClientLimits(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """calls_per_minute: tool calls a client may start per minute (a bucket that refills
    evenly); max_concurrent_calls: tool calls in flight at once; max_sandboxes: running
    sandboxes a client has created through this server."""

    calls_per_minute: int = 120
    max_concurrent_calls: int = 4
    max_sandboxes: int = 5


class LimitExceededError(TartarusError):
    """A tool call over its client's limits (refused before it reaches the API)."""


@dataclass
class _Usage:
    tokens: float
    refilled: float
    in_flight: int = 0


@dataclass
class Limiter:
    """The calls-per-minute bucket and in-flight count of every client (in memory)."""

    limits: ClientLimits
    _usage: dict[str, _Usage] = field(default_factory=dict)

    @contextlib.contextmanager
    def call(self, client: str) -> Iterator[None]:
        """Admits one tool call of `client` for as long as the block runs, or raises
        LimitExceededError."""
        now = time.monotonic()
        usage = self._usage.setdefault(
            client, _Usage(tokens=float(self.limits.calls_per_minute), refilled=now)
        )
        rate = self.limits.calls_per_minute / 60.0
        usage.tokens = min(
            float(self.limits.calls_per_minute), usage.tokens + (now - usage.refilled) * rate
        )
        usage.refilled = now
        if usage.in_flight >= self.limits.max_concurrent_calls:
            raise LimitExceededError(
                f"over this client's limit of {self.limits.max_concurrent_calls} tool calls "
                "at once: wait for one to finish"
            )
        if usage.tokens < 1.0:
            wait = (1.0 - usage.tokens) / rate
            raise LimitExceededError(
                f"over this client's limit of {self.limits.calls_per_minute} tool calls a "
                f"minute: try again in {wait:.1f} s"
            )
        usage.tokens -= 1.0
        usage.in_flight += 1
        try:
            yield
        finally:
            usage.in_flight -= 1
