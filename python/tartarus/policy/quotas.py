"""Quotas (Minos): tenant quotas, held before a sandbox is created and given back when it ends.

Each admitted request holds its share (one sandbox, its vCPUs, its memory, one instance
of its template) from the moment it is admitted until the sandbox ends or its creation
fails. The check and the hold happen together with no await in between, so concurrent
creates on one event loop can never be admitted past a limit.

API servers of a fleet hold in shared state instead (`SharedHolds`, implemented in
`tartarus.fleet.quota`), where the check and the hold are one atomic step, so the quota
holds across all of them.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Protocol

import msgspec

from tartarus.policy.documents import Quotas
from tartarus.policy.verdicts import AdmissionRequest, Verdict

NAME = "minos"


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    template: str
    vcpus: float
    memory_mib: int


class SharedHolds(Protocol):
    """Holds in state shared by many API servers, keyed by the sandbox's id."""

    async def hold(self, tenant: str, sandbox_id: str, want: Usage, quotas: Quotas) -> str | None:
        """Holds `want` atomically, or returns why the tenant's quota refuses it."""
        ...

    async def release(self, tenant: str, sandbox_id: str) -> None: ...


def wanted(admission: AdmissionRequest) -> Usage:
    request = admission.request
    resources = request.resources.to_runtime()
    return Usage(template=request.template, vcpus=resources.vcpus, memory_mib=resources.memory_mib)


async def rule_shared(admission: AdmissionRequest, holds: SharedHolds, sandbox_id: str) -> Verdict:
    """Minos's ruling with the hold kept in `holds` under `sandbox_id` (when admitted)."""
    tenant = admission.caller.tenant
    refusal = await holds.hold(tenant, sandbox_id, wanted(admission), admission.policy.resources)
    if refusal is not None:
        return Verdict(judge=NAME, allowed=False, reason=refusal, status=429)
    return Verdict(judge=NAME, allowed=True, reason=f"tenant {tenant} holds its share fleet-wide")


class Hold:
    """One admitted request's share of its tenant's quota."""

    def __init__(self, keeper: QuotaKeeper, tenant: str, key: object) -> None:
        self._keeper = keeper
        self.tenant = tenant
        self.key = key

    def bind(self, sandbox_id: str) -> None:
        self._keeper._rekey(self, sandbox_id)

    def release(self) -> None:
        self._keeper._drop(self.tenant, self.key)


class QuotaKeeper:
    def __init__(self) -> None:
        self._held: dict[str, dict[object, Usage]] = defaultdict(dict)
        self._tickets = itertools.count()

    def usage(self, tenant: str) -> list[Usage]:
        return list(self._held.get(tenant, {}).values())

    def rule(self, admission: AdmissionRequest) -> tuple[Verdict, Hold | None]:
        """Admits within the tenant's quota and holds the share, or refuses (429)."""
        tenant = admission.caller.tenant
        want = wanted(admission)
        held = list(self._held.get(tenant, {}).values())
        refusal = over_quota(admission.policy.resources, tenant, held, want)
        if refusal is not None:
            return Verdict(judge=NAME, allowed=False, reason=refusal, status=429), None
        key = ("ticket", next(self._tickets))
        self._held[tenant][key] = want
        return (
            Verdict(
                judge=NAME,
                allowed=True,
                reason=f"tenant {tenant} holds {len(held) + 1} sandbox(es) with this one",
            ),
            Hold(self, tenant, key),
        )

    def hold(self, admission: AdmissionRequest, sandbox_id: str) -> Hold:
        """Holds the share of a sandbox already running (taken back after a restart),
        whatever the quota says now: it was admitted when it was created."""
        self._held[admission.caller.tenant][sandbox_id] = wanted(admission)
        return Hold(self, admission.caller.tenant, sandbox_id)

    def ended(self, tenant: str, sandbox_id: str) -> None:
        self._drop(tenant, sandbox_id)

    def _rekey(self, hold: Hold, sandbox_id: str) -> None:
        usage = self._held[hold.tenant].pop(hold.key, None)
        if usage is not None:
            self._held[hold.tenant][sandbox_id] = usage
            hold.key = sandbox_id

    def _drop(self, tenant: str, key: object) -> None:
        held = self._held.get(tenant)
        if held is not None:
            held.pop(key, None)
            if not held:
                del self._held[tenant]


def over_quota(quotas: Quotas, tenant: str, held: list[Usage], want: Usage) -> str | None:
    """Why `want` does not fit beside what the tenant holds, or None if it does."""
    if quotas.max_sandboxes is not None and len(held) + 1 > quotas.max_sandboxes:
        return (
            f"tenant {tenant} already runs {len(held)} of its {quotas.max_sandboxes} "
            "concurrent sandboxes; delete one or ask for a higher quota"
        )
    vcpus = sum(u.vcpus for u in held)
    if quotas.max_vcpus is not None and vcpus + want.vcpus > quotas.max_vcpus + 1e-9:
        return (
            f"tenant {tenant} uses {vcpus:g} of {quotas.max_vcpus:g} vCPUs; "
            f"{want.vcpus:g} more do not fit"
        )
    memory = sum(u.memory_mib for u in held)
    if quotas.max_memory_mib is not None and memory + want.memory_mib > quotas.max_memory_mib:
        return (
            f"tenant {tenant} uses {memory} of {quotas.max_memory_mib} MiB of memory; "
            f"{want.memory_mib} MiB more do not fit"
        )
    limit = quotas.per_template.get(want.template)
    running = sum(1 for u in held if u.template == want.template)
    if limit is not None and running + 1 > limit:
        return (
            f"tenant {tenant} already runs {running} of its {limit} sandboxes of "
            f"template {want.template!r}"
        )
    return None
