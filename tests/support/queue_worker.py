"""A queue consumer in its own process, driven over stdin/stdout by the queue tests.

argv: BACKEND (sqlite|redis) LOCATION (db path or redis URL) QUEUE VISIBILITY_S.
Commands, one per line: `get` (no wait) and `ack ID`, ID being the `id` a `get` answered
(`<lane>/<message id>`). Answers are JSON lines. The tests kill this process with
SIGKILL between a `get` and its `ack`, as a crash would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from tartarus.queue import Message, QueueSettings, WorkQueue
from tartarus.queue.redis_streams import RedisQueue
from tartarus.queue.sqlite import SqliteQueue


async def main(backend: str, location: str, name: str, visibility_s: float) -> None:
    settings = QueueSettings(visibility_timeout_s=visibility_s, max_deliveries=1000)
    queue: WorkQueue
    if backend == "redis":
        queue = RedisQueue(aioredis.Redis.from_url(location), name, settings)
    else:
        queue = SqliteQueue(Path(location), name, settings)
    held: dict[str, Message] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "get":
            message = await queue.get("worker", timeout_s=0)
            if message is None:
                print(json.dumps({"none": True}), flush=True)
                continue
            # Stream ids are unique per lane only (two lanes can hand out the same id in
            # one millisecond): the handle names both, as Message does for `ack`.
            handle = f"{message.lane.value}/{message.id}"
            held[handle] = message
            answer = {
                "id": handle,
                "lane": message.lane.value,
                "body": message.body.decode(),
                "deliveries": message.deliveries,
            }
            print(json.dumps(answer), flush=True)
        elif command == "ack":
            await queue.ack(held.pop(arg))
            print(json.dumps({"ok": True}), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
