"""The seam between the sandbox manager and admission (the Judges, `tartarus.policy`).

Before a sandbox is created the manager asks `AdmissionHook.admit`, which either
refuses (raising a problem with the judges' verdicts) or returns an `Admitted`: the
request to carry out (with policy defaults applied), a hold on the tenant's quota that
the manager binds to the new sandbox or releases if creation fails, and a chance to wrap
the runtime's sandbox (secrets are injected there, at exec time). `ended` gives the
quota back when the sandbox ends.

Defaults are resolved (`tartarus.node.defaults.resolve`) before any judge sits, so
quotas judge the numbers the sandbox will get: what the request sets, else the policy's
defaults for the template, else the template's own (`TemplateDefaults`), else the
server's.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from tartarus.api.sandbox import OnTimeout
from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.node.defaults import Layer, layer, resolve
from tartarus.node.store import SandboxRecord
from tartarus.runtime.base import Sandbox
from tartarus.runtime.types import Resources


class TemplateDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """A template's own resources, timeout and lifecycle (from its definition)."""

    resources: Resources
    timeout_s: float
    on_timeout: OnTimeout | None = None
    auto_pause_after_s: float | None = None
    stop_grace_s: float | None = None

    def layer(self) -> Layer:
        return layer(
            self.resources,
            self.timeout_s,
            on_timeout=self.on_timeout,
            auto_pause_after_s=self.auto_pause_after_s,
            stop_grace_s=self.stop_grace_s,
        )


def with_template_file_defaults(
    request: CreateSandboxRequest, defaults: TemplateDefaults | None
) -> CreateSandboxRequest:
    """`request` resolved without a tenant's policy (`tartarus.node.defaults`)."""
    return resolve(request, template=None if defaults is None else defaults.layer())


class Admitted(Protocol):
    @property
    def request(self) -> CreateSandboxRequest: ...

    @property
    def egress(self) -> list[str]:
        """What the sandbox may reach if it has a network: the policy's `network.egress`
        entries for its tenant and template (`tartarus.network.egress`); empty: any
        public destination."""
        ...

    def bind(self, record: SandboxRecord, sandbox: Sandbox) -> Sandbox:
        """The sandbox was created: keep the hold for it; returns the sandbox the server
        should use."""
        ...

    def release(self) -> None:
        """Creation failed: give the hold back."""
        ...


class AdmissionHook(Protocol):
    async def admit(
        self,
        caller: Principal,
        request: CreateSandboxRequest,
        defaults: TemplateDefaults | None = None,
        *,
        hold_as: str | None = None,
    ) -> Admitted:
        """`defaults`: the template's own, for what neither the request nor the policy
        sets. `hold_as`: a fleet's API server holds the tenant's quota share in shared
        state under this sandbox id (and releases it there when the sandbox ends)."""
        ...

    def readmit(
        self, record: SandboxRecord, caller: Principal, request: CreateSandboxRequest
    ) -> Admitted:
        """A sandbox that outlived a restart, taken back: no judge, its hold again."""
        ...

    def ended(self, record: SandboxRecord) -> None: ...


class _Admitted:
    def __init__(self, request: CreateSandboxRequest) -> None:
        self.request = request
        self.egress: list[str] = []

    def bind(self, record: SandboxRecord, sandbox: Sandbox) -> Sandbox:
        return sandbox

    def release(self) -> None:
        pass


class AdmitAll:
    """No judges: every request is admitted as it is."""

    async def admit(
        self,
        caller: Principal,
        request: CreateSandboxRequest,
        defaults: TemplateDefaults | None = None,
        *,
        hold_as: str | None = None,
    ) -> Admitted:
        return _Admitted(with_template_file_defaults(request, defaults))

    def readmit(
        self, record: SandboxRecord, caller: Principal, request: CreateSandboxRequest
    ) -> Admitted:
        return _Admitted(resolve(request))

    def ended(self, record: SandboxRecord) -> None:
        pass
