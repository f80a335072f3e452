"""How an API server runs its part of a fleet: `[fleet]` in tartarus.toml."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from tartarus.enforcement.records import LimitPolicy
from tartarus.queue import QueueSettings
from tartarus.scheduling.heat import PoolRouting
from tartarus.scheduling.scheduler import Strategy


class FleetSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an API server runs its part of the fleet (`[fleet]` in tartarus.toml)."""

    # Work no node can take within this many seconds fails (and is dead-lettered).
    placement_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    # A create request waits at most this long for its node to report the sandbox.
    create_timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    strategy: Strategy = Strategy.LEAST_LOADED
    routing: PoolRouting = msgspec.field(default_factory=PoolRouting)
    lanes: QueueSettings = msgspec.field(default_factory=QueueSettings)
    inbox: QueueSettings = msgspec.field(default_factory=QueueSettings)
    heartbeat_ttl_s: Annotated[float, Meta(gt=0)] = 10.0
    # Scheduler workers per API server (each places one sandbox at a time).
    schedulers: Annotated[int, Meta(ge=1, le=256)] = 8
    # Times work goes back to the lanes when its node dies before starting it.
    max_reschedules: Annotated[int, Meta(ge=0)] = 3
    # Tisiphone's rules on every node agent (memory and CPU against each sandbox's limits).
    limits: LimitPolicy = msgspec.field(default_factory=LimitPolicy)
    # Error records and enforcement events are kept this long.
    retention_s: Annotated[float, Meta(gt=0)] = 7 * 24 * 3600.0
