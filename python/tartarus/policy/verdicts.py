"""What every judge is asked and what it answers."""

from __future__ import annotations

from typing import Protocol

import msgspec

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.policy.documents import PolicySpec


class AdmissionRequest(msgspec.Struct, frozen=True, kw_only=True):
    caller: Principal
    # The create request with the tenant's template defaults applied.
    request: CreateSandboxRequest
    # The caller's tenant's effective policy.
    policy: PolicySpec


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    judge: str
    allowed: bool
    reason: str
    # The HTTP status of a refusal (403 for policy, 429 for quota).
    status: int = 403


class Judge(Protocol):
    """An admission judge. Operators add their own through the `tartarus.judges` entry
    point group: the entry point names a class (or factory) called with no arguments
    that returns a Judge."""

    name: str

    async def judge(self, request: AdmissionRequest) -> Verdict: ...
