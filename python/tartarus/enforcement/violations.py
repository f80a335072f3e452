"""Megaera: policy violations recorded against a sandbox and its tenant; a tenant that
keeps violating is quarantined (its next sandboxes run only in the quarantine pool)."""

from __future__ import annotations

from tartarus.enforcement.records import Action, EnforcementEvent, Fury

# Violations by one tenant (within what the events log keeps) before it is quarantined.
QUARANTINE_AFTER = 3


def violation(sandbox_id: str, tenant: str, detail: str) -> EnforcementEvent:
    return EnforcementEvent(
        fury=Fury.POLICY_VIOLATION,
        action=Action.RECORD,
        sandbox_id=sandbox_id,
        tenant=tenant,
        detail=detail,
    )


def escalate(earlier: list[EnforcementEvent], tenant: str) -> EnforcementEvent | None:
    """The quarantine that `earlier` violations by `tenant` (this one included) call for."""
    count = sum(
        1
        for e in earlier
        if e.fury is Fury.POLICY_VIOLATION and e.action is Action.RECORD and e.tenant == tenant
    )
    if not tenant or count < QUARANTINE_AFTER:
        return None
    return EnforcementEvent(
        fury=Fury.POLICY_VIOLATION,
        action=Action.QUARANTINE,
        sandbox_id=earlier[0].sandbox_id if earlier else "",
        tenant=tenant,
        detail=f"{count} policy violations by tenant {tenant!r}",
    )
