"""What API servers and node agents say to each other (`/v1/nodes/...`), as msgspec
Structs. A node authenticates with the join token as a bearer token."""

from __future__ import annotations

import msgspec

from tartarus.api.types import CreateSandboxRequest
from tartarus.enforcement.records import EnforcementEvent, ErrorRecord, PeakUse
from tartarus.node.store import SandboxRecord
from tartarus.queue import Lane, Message
from tartarus.scheduling.heat import Heat
from tartarus.scheduling.nodes import NodeUsage


class Job(msgspec.Struct, kw_only=True, frozen=True):
    """One sandbox to create, as it travels through the lanes and a node's inbox."""

    sandbox_id: str
    request: CreateSandboxRequest
    lane: Lane
    heat: Heat
    tenant: str = "default"
    # The principal that asked for it (its node records it as the owner).
    owner: str = ""
    quarantined: bool = False
    # After this (unix seconds) a job no node could take fails with the reason.
    place_by: float
    # Times the job went back to the lanes because its node died before starting it.
    reschedules: int = 0
    # What the judges let it reach if it has a network (`tartarus.network.egress`).
    egress: list[str] = msgspec.field(default_factory=list)


class JoinReply(msgspec.Struct, kw_only=True, frozen=True):
    node_id: str
    heartbeat_s: float
    ttl_s: float
    # Sandboxes the fleet believes run on this node; the node kills any other it still
    # runs (the fleet declared them lost while the node was cut off).
    expected: list[str]


class Heartbeat(msgspec.Struct, kw_only=True, frozen=True):
    usage: NodeUsage
    draining: bool = False


class WorkRequest(msgspec.Struct, kw_only=True, frozen=True):
    wait_s: float = 10.0
    max: int = 8


class WorkBatch(msgspec.Struct, kw_only=True, frozen=True):
    items: list[Message]


class WorkDone(msgspec.Struct, kw_only=True, frozen=True):
    """The outcome of one inbox message: the sandbox's record as the node has it."""

    message: Message
    record: SandboxRecord


class WorkVerdict(msgspec.Struct, kw_only=True, frozen=True):
    # False: the sandbox was deleted while the node created it; the node stops it.
    keep: bool


class NodeReport(msgspec.Struct, kw_only=True, frozen=True):
    """Changes a node saw since its last report, oldest first."""

    records: list[SandboxRecord] = msgspec.field(default_factory=list)
    events: list[EnforcementEvent] = msgspec.field(default_factory=list)
    errors: list[ErrorRecord] = msgspec.field(default_factory=list)
    # Peak use of sandboxes that ended (heat history).
    peaks: list[PeakUse] = msgspec.field(default_factory=list)


encode = msgspec.json.Encoder().encode
