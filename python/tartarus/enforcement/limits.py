"""Limit enforcement (the Furies on a node): Tisiphone watches each sandbox's memory and
CPU against its limits and acts per policy, and records each process the kernel killed
at the memory limit (an `oom-kill` event: the limit enforced itself before a rule could
act).
(Alecto, the timeout, is the node's deadline loop; the node reports each timeout kill
as her event. Megaera is on the API servers: `violations`.)

Each action is an `EnforcementEvent` in the node's outbox, reported to the fleet. A
`quarantine` action kills the sandbox and flags its tenant, so its next sandboxes run
only in the quarantine pool (Typhon). When a sandbox ends, the most it used of what it
asked for (`PeakUse`) goes to the fleet too: the history heat classes learn from.
"""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import anyio
import msgspec

from tartarus.enforcement.records import (
    Action,
    EnforcementEvent,
    Fury,
    LimitPolicy,
    LimitRule,
    PeakUse,
)
from tartarus.node.manager import LiveSandbox, SandboxManager
from tartarus.runtime.types import SandboxState

log = logging.getLogger(__name__)

MIB = 1 << 20
STATS_TIMEOUT_S = 2.0


class Sink(Protocol):
    def event(self, event: EnforcementEvent) -> None: ...

    def peak(self, peak: PeakUse) -> None: ...


@runtime_checkable
class Throttleable(Protocol):
    """A sandbox whose backend can lower its CPU quota while it runs."""

    async def throttle(self, vcpus: float) -> None: ...


def triggered(rules: list[LimitRule], share: float) -> LimitRule | None:
    """The strongest rule `share` reaches."""
    reached = [r for r in rules if share >= r.share]
    return max(reached, key=lambda r: r.share) if reached else None


class LimitEnforcer:
    def __init__(self, manager: SandboxManager, policy: LimitPolicy, sink: Sink) -> None:
        self.manager = manager
        self.policy = policy
        self.sink = sink
        self._cpu: dict[str, float] = {}
        self._oom_kills: dict[str, int] = {}
        self._fired: set[tuple[str, str, Action]] = set()
        self._peaks: dict[str, PeakUse] = {}

    async def watch_forever(self) -> None:
        while True:
            await anyio.sleep(self.policy.interval_s)
            await self.watch_once()

    async def watch_once(self) -> None:
        live = self.manager.live_sandboxes()
        self.forget_ended({x.record.id for x in live})
        for sandbox in live:
            try:
                await self.check(sandbox)
            except Exception:
                log.debug("could not check sandbox %s", sandbox.record.id, exc_info=True)

    def forget_ended(self, current: set[str]) -> None:
        """Drops what was kept about sandboxes that ended, and reports their peak use."""
        self._cpu = {k: v for k, v in self._cpu.items() if k in current}
        self._oom_kills = {k: v for k, v in self._oom_kills.items() if k in current}
        self._fired = {f for f in self._fired if f[0] in current}
        for sandbox_id in [k for k in self._peaks if k not in current]:
            self.sink.peak(self._peaks.pop(sandbox_id))

    async def check(self, live: LiveSandbox) -> None:
        with anyio.fail_after(STATS_TIMEOUT_S):
            stats = await live.sandbox.stats()
        record = live.record
        limit = stats.memory_limit_bytes or record.resources.memory_mib * MIB
        memory_share = stats.memory_bytes / limit if limit else 0.0
        last = self._cpu.get(record.id)
        self._cpu[record.id] = stats.cpu_seconds
        cpu_share = (
            (stats.cpu_seconds - last) / (self.policy.interval_s * record.resources.vcpus)
            if last is not None
            else 0.0
        )
        self._note_peak(live, cpu_share, memory_share)
        if stats.oom_kills > self._oom_kills.get(record.id, 0):
            new = stats.oom_kills - self._oom_kills.get(record.id, 0)
            self._oom_kills[record.id] = stats.oom_kills
            self._event(
                live,
                Action.OOM_KILL,
                f"the kernel killed {new} process(es) at the memory limit ({limit // MIB} MiB)",
                float(new),
            )
        for metric, share, rules in (
            ("memory", memory_share, self.policy.memory),
            ("cpu", cpu_share, self.policy.cpu),
        ):
            rule = triggered(rules, share)
            if rule is not None and (record.id, metric, rule.action) not in self._fired:
                self._fired.add((record.id, metric, rule.action))
                await self.act(live, metric, share, rule.action)

    def _note_peak(self, live: LiveSandbox, cpu_share: float, memory_share: float) -> None:
        record = live.record
        peak = self._peaks.get(record.id) or PeakUse(
            sandbox_id=record.id, template=record.template, tenant=record.tenant
        )
        self._peaks[record.id] = msgspec.structs.replace(
            peak,
            cpu_share=max(peak.cpu_share, cpu_share),
            memory_share=max(peak.memory_share, memory_share),
        )

    async def act(self, live: LiveSandbox, metric: str, share: float, action: Action) -> None:
        record = live.record
        detail = f"{metric} at {share:.0%} of its limit"
        if action is Action.THROTTLE:
            if isinstance(live.sandbox, Throttleable):
                await live.sandbox.throttle(record.resources.vcpus / 2)
                detail += f"; throttled to {record.resources.vcpus / 2:g} vCPUs"
            else:
                detail += f"; the {record.backend.value} backend cannot throttle, so only warned"
        elif action in (Action.KILL, Action.QUARANTINE):
            await self.manager.end(
                record.id, SandboxState.FAILED, f"killed by Tisiphone ({action.value}): {detail}"
            )
        self._event(live, action, detail, share)

    def _event(self, live: LiveSandbox, action: Action, detail: str, value: float) -> None:
        self.sink.event(
            EnforcementEvent(
                fury=Fury.RESOURCE_LIMIT,
                action=action,
                sandbox_id=live.record.id,
                detail=detail,
                tenant=live.record.tenant,
                value=value,
            )
        )
