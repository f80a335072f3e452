"""Megaera on a node: packets the network layer (Styx) dropped for a sandbox, because
its egress policy forbids the destination or the source was not its own address, are
policy violations. The enforcer's counters are read every `interval_s`; a sandbox whose
counts grew gets one `policy-violation` event for the interval (its value: the new
drops), and the counts are served at `/metrics` as
`tartarus_sandbox_egress_dropped_packets{sandbox,reason}` (reason: `denied` or
`spoofed`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import anyio

from tartarus.enforcement.records import Action, EnforcementEvent, Fury
from tartarus.network.egress import Drops
from tartarus.network.namespaces import SandboxNetworks
from tartarus.node.manager import SandboxManager

log = logging.getLogger(__name__)

INTERVAL_S: Final = 1.0


class EventSink(Protocol):
    def event(self, event: EnforcementEvent) -> None: ...


class DropGauge(Protocol):
    def set_drops(self, sandbox_id: str, drops: Drops) -> None: ...

    def forget_drops(self, sandbox_id: str) -> None: ...


def describe(old: Drops, new: Drops) -> str:
    parts = []
    if new.denied > old.denied:
        parts.append(f"{new.denied - old.denied} packet(s) to destinations its policy denies")
    if new.spoofed > old.spoofed:
        parts.append(f"{new.spoofed - old.spoofed} packet(s) with a source address not its own")
    return "network egress dropped " + " and ".join(parts)


class EgressDropWatcher:
    def __init__(
        self,
        manager: SandboxManager,
        networks: Callable[[], Iterable[SandboxNetworks]],
        gauge: DropGauge,
        sinks: Iterable[EventSink] = (),
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.manager = manager
        self.networks = networks
        self.gauge = gauge
        self.sinks = list(sinks)
        self.interval_s = interval_s
        self._seen: dict[str, Drops] = {}

    async def watch_forever(self) -> None:
        while True:
            await anyio.sleep(self.interval_s)
            try:
                await self.poll_once()
            except Exception:
                log.debug("reading the egress drop counters failed", exc_info=True)

    async def poll_once(self) -> list[EnforcementEvent]:
        """Reads the counters once; returns the events it emitted."""
        current: dict[str, Drops] = {}
        for networks in self.networks():
            current.update(await networks.drops())
        tenants = {live.record.id: live.record.tenant for live in self.manager.live_sandboxes()}
        events: list[EnforcementEvent] = []
        for sandbox_id, drops in current.items():
            old = self._seen.get(sandbox_id, Drops())
            self.gauge.set_drops(sandbox_id, drops)
            grew = (drops.denied - old.denied) + (drops.spoofed - old.spoofed)
            if grew > 0:
                event = EnforcementEvent(
                    fury=Fury.POLICY_VIOLATION,
                    action=Action.RECORD,
                    sandbox_id=sandbox_id,
                    tenant=tenants.get(sandbox_id, ""),
                    detail=describe(old, drops),
                    value=float(grew),
                )
                events.append(event)
                for sink in self.sinks:
                    sink.event(event)
        for gone in self._seen.keys() - current.keys():
            self.gauge.forget_drops(gone)
        self._seen = current
        return events
