"""The queue interface shared by the SQLite and Redis Streams implementations."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Protocol

import msgspec
from msgspec import Meta

from tartarus.errors import TartarusError


class Lane(StrEnum):
    """Priority lanes: a consumer takes `swift` work before `main`, `main` before `deep`."""

    SWIFT = "swift"
    MAIN = "main"
    DEEP = "deep"


# Priority order, highest first.
LANES: tuple[Lane, ...] = (Lane.SWIFT, Lane.MAIN, Lane.DEEP)


class QueueSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Messages a lane may hold (waiting plus in flight) before `put` refuses more.
    max_depth: Annotated[int, Meta(ge=1)] = 10_000
    # An unacknowledged message is delivered again this long after its last delivery.
    visibility_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    # A message delivered this many times without an acknowledgement is dead-lettered.
    max_deliveries: Annotated[int, Meta(ge=1)] = 5


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery of a message. `deliveries` counts this one (1 on the first)."""

    id: str
    lane: Lane
    body: bytes
    enqueued_at: float
    deliveries: int
    # Who took it (the consumer name given to `get`).
    consumer: str = ""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message that will not be delivered again, and why."""

    id: str
    queue: str
    lane: Lane
    body: bytes
    reason: str
    deliveries: int
    failed_at: float


class LaneDepth(msgspec.Struct, frozen=True, kw_only=True):
    waiting: int
    in_flight: int


class QueueError(TartarusError):
    pass


class QueueFullError(QueueError):
    def __init__(self, queue: str, lane: Lane, depth: int, limit: int) -> None:
        super().__init__(
            f"the {lane.value} lane of queue {queue!r} is full ({depth} of {limit} messages "
            "waiting or in flight); retry later"
        )
        self.queue = queue
        self.lane = lane
        self.depth = depth
        self.limit = limit


def poison_reason(deliveries: int, settings: QueueSettings) -> str:
    return (
        f"delivered {deliveries} times without an acknowledgement (limit "
        f"{settings.max_deliveries}, visibility timeout {settings.visibility_timeout_s:g} s)"
    )


class WorkQueue(Protocol):
    """At-least-once work queue with priority lanes.

    A message taken by `get` is invisible to other consumers until it is acknowledged
    (`ack`), released for another try (`retry`), dead-lettered (`bury`), or until the
    visibility timeout passes (a crashed consumer), after which it is delivered again.
    """

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> QueueSettings: ...

    async def put(self, body: bytes, lane: Lane = Lane.MAIN) -> str:
        """Adds a message; returns its id. Raises QueueFullError when the lane is full."""
        ...

    async def get(self, consumer: str, *, timeout_s: float) -> Message | None:
        """The oldest available message of the highest lane, waiting up to `timeout_s`;
        None when nothing came."""
        ...

    async def ack(self, message: Message) -> None:
        """Done: the message is removed for good. Acknowledging twice is harmless."""
        ...

    async def retry(self, message: Message, reason: str) -> None:
        """Makes the message available again at once (dead-lettered with `reason` when
        it has used up its deliveries)."""
        ...

    async def bury(self, message: Message, reason: str) -> None:
        """Moves the message to the dead letters with `reason`."""
        ...

    async def extend(self, message: Message) -> None:
        """Restarts the message's visibility timeout (the consumer is still on it)."""
        ...

    async def drain(self) -> list[Message]:
        """Removes and returns every message, waiting or in flight (the queue of a node
        that is gone, whose work goes elsewhere)."""
        ...

    async def depth(self) -> dict[Lane, LaneDepth]: ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        ...

    async def close(self) -> None: ...
