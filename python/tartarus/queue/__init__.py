"""Acheron: the work queue, the river every request crosses before it runs.

One interface (`WorkQueue`) with two implementations: `SqliteQueue` (embedded, one
host, any number of processes) and `RedisQueue` (Redis Streams with consumer groups,
many hosts). Both give at-least-once delivery with acknowledgements, a visibility
timeout after which an unacknowledged message is delivered again, a poison-message
limit that moves a message to the dead-letter store with the reason, three priority
lanes (`swift` before `main` before `deep`, oldest first within a lane) and a depth
limit per lane that refuses new work (`QueueFullError`, a 429 at the API).
"""

from tartarus.queue.base import (
    LANES,
    DeadLetter,
    Lane,
    LaneDepth,
    Message,
    QueueError,
    QueueFullError,
    QueueSettings,
    WorkQueue,
)

__all__ = [
    "LANES",
    "DeadLetter",
    "Lane",
    "LaneDepth",
    "Message",
    "QueueError",
    "QueueFullError",
    "QueueSettings",
    "WorkQueue",
]
