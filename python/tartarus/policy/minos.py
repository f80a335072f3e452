"""Minos: tenant quotas, held before a sandbox is created and given back when it ends.

Each admitted request holds its share (one sandbox, its vCPUs, its memory, one instance
of its template) from the moment it is admitted until the sandbox ends or its creation
fails. The check and the hold happen together with no await in between, so concurrent
creates on one event loop can never be admitted past a limit.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import msgspec

from tartarus.policy.documents import Quotas
from tartarus.policy.verdicts import AdmissionRequest, Verdict

NAME = "minos"


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    template: str
    vcpus: float
    memory_mib: int


class Hold:
    """One admitted request's share of its tenant's quota."""

    def __init__(self, minos: Minos, tenant: str, key: object) -> None:
        self._minos = minos
        self.tenant = tenant
        self.key = key

    def bind(self, sandbox_id: str) -> None:
        self._minos._rekey(self, sandbox_id)

    def release(self) -> None:
        self._minos._drop(self.tenant, self.key)


class Minos:
    def __init__(self) -> None:
        self._held: dict[str, dict[object, Usage]] = defaultdict(dict)
        self._tickets = itertools.count()

    def usage(self, tenant: str) -> list[Usage]:
        return list(self._held.get(tenant, {}).values())

    def rule(self, admission: AdmissionRequest) -> tuple[Verdict, Hold | None]:
        """Admits within the tenant's quota and holds the share, or refuses (429)."""
        tenant = admission.caller.tenant
        request = admission.request
        quotas = admission.policy.resources
        want = Usage(
            template=request.template,
            vcpus=request.resources.vcpus,
            memory_mib=request.resources.memory_mib,
        )
        held = list(self._held.get(tenant, {}).values())
        refusal = _over(quotas, tenant, held, want)
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


def _over(quotas: Quotas, tenant: str, held: list[Usage], want: Usage) -> str | None:
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
