"""The Judges in session: every create request is ruled on before anything is queued.

Order: Rhadamanthus (security policy), then the other judges (the secrets check, the
operator's plugins), each only if all before it agreed, then Minos (quota, which holds
the tenant's share only once everyone else has agreed), then Aeacus writes the
decision and every verdict to the audit log. If the audit log cannot be written the
request is refused: nothing is admitted without a record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points

from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.principal import Principal
from tartarus.errors import AdmissionDeniedError, ConfigError, UnavailableError
from tartarus.node.admission import Admitted, TemplateDefaults
from tartarus.node.defaults import Layer, layer, resolve
from tartarus.node.store import SandboxRecord
from tartarus.policy.audit_log import AuditError, AuditLog
from tartarus.policy.documents import PolicySpec
from tartarus.policy.quotas import Hold, QuotaKeeper, SharedHolds, rule_shared
from tartarus.policy.security_policy import SecurityJudge
from tartarus.policy.store import PolicyStore
from tartarus.policy.verdicts import AdmissionRequest, Judge, Verdict
from tartarus.runtime.base import Sandbox

log = logging.getLogger(__name__)

PLUGIN_GROUP = "tartarus.judges"

SandboxWrapper = Callable[[SandboxRecord, Sandbox], Sandbox]


def load_plugins(group: str = PLUGIN_GROUP) -> list[Judge]:
    """Every judge installed under the entry point group; a broken one stops the server
    (admission must not silently lose a judge)."""
    judges: list[Judge] = []
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            judge = ep.load()()
        except Exception as e:
            raise ConfigError(
                f"the admission judge plugin {ep.name!r} ({ep.value}) fails: {e}"
            ) from e
        if not callable(getattr(judge, "judge", None)) or not isinstance(
            getattr(judge, "name", None), str
        ):
            raise ConfigError(
                f"the admission judge plugin {ep.name!r} ({ep.value}) has no `name` and "
                "async `judge(request)`"
            )
        judges.append(judge)
    return judges


def policy_defaults(policy: PolicySpec, template: str) -> Layer | None:
    """The policy's defaults for `template`, as a layer of `tartarus.node.defaults`."""
    defaults = policy.templates.defaults.get(template)
    if defaults is None:
        return None
    return layer(defaults.resources, defaults.timeout_s, defaults.backend)


def egress_for(policy: PolicySpec, template: str) -> list[str]:
    """The egress entries for a sandbox of `template`: the policy's defaults for the
    template when they name some, else its `network.egress`."""
    defaults = policy.templates.defaults.get(template)
    if defaults is not None and defaults.egress is not None:
        return list(defaults.egress)
    return list(policy.network.egress)


def with_template_defaults(
    policy: PolicySpec, request: CreateSandboxRequest
) -> CreateSandboxRequest:
    """`request` resolved with the policy's defaults for its template (and no template
    definition): what `Judges.admit` does first."""
    return resolve(request, policy=policy_defaults(policy, request.template))


class _Admitted:
    """`hold` is None when the share is held in shared state (whoever asked for that
    releases it)."""

    def __init__(
        self,
        request: CreateSandboxRequest,
        hold: Hold | None,
        wrap: SandboxWrapper,
        egress: list[str],
    ) -> None:
        self.request = request
        self.egress = egress
        self._hold = hold
        self._wrap = wrap

    def bind(self, record: SandboxRecord, sandbox: Sandbox) -> Sandbox:
        if self._hold is not None:
            self._hold.bind(record.id)
        return self._wrap(record, sandbox)

    def release(self) -> None:
        if self._hold is not None:
            self._hold.release()


def _verdict_doc(v: Verdict) -> dict[str, object]:
    return {"judge": v.judge, "allowed": v.allowed, "reason": v.reason}


class Judges:
    """The `AdmissionHook` the sandbox manager calls."""

    def __init__(
        self,
        *,
        policies: PolicyStore | None = None,
        audit: AuditLog | None = None,
        plugins: list[Judge] | None = None,
        wrap: SandboxWrapper = lambda record, sandbox: sandbox,
    ) -> None:
        self.policies = policies
        self.audit = audit
        self.quotas = QuotaKeeper()
        # Set on a fleet's API servers: quota holds shared by all of them.
        self.shared: SharedHolds | None = None
        self.judges: list[Judge] = [SecurityJudge(), *(plugins or [])]
        self._wrap = wrap

    def policy(self, tenant: str) -> PolicySpec:
        return PolicySpec() if self.policies is None else self.policies.effective(tenant).spec

    async def admit(
        self,
        caller: Principal,
        request: CreateSandboxRequest,
        defaults: TemplateDefaults | None = None,
        *,
        hold_as: str | None = None,
    ) -> Admitted:
        """`hold_as`: with shared holds, the sandbox id to hold the quota share under,
        in the shared state (the caller releases it when that sandbox ends)."""
        policy = self.policy(caller.tenant)
        request = resolve(
            request,
            policy=policy_defaults(policy, request.template),
            template=None if defaults is None else defaults.layer(),
        )
        admission = AdmissionRequest(caller=caller, request=request, policy=policy)
        verdicts: list[Verdict] = []
        for judge in self.judges:
            # A judge sits only if those before it agreed: later ones (plugins, the
            # secrets check) never act on a request the security policy refused.
            try:
                verdicts.append(await judge.judge(admission))
            except Exception as e:
                log.exception("admission judge %s failed", judge.name)
                verdicts.append(
                    Verdict(judge=judge.name, allowed=False, reason=f"the judge failed: {e}")
                )
            if not verdicts[-1].allowed:
                break
        hold: Hold | None = None
        shared = self.shared if hold_as is not None else None
        if all(v.allowed for v in verdicts):
            if shared is not None and hold_as is not None:
                verdicts.append(await rule_shared(admission, shared, hold_as))
            else:
                # No await between Minos's check and its hold: see tartarus.policy.quotas.
                verdict, hold = self.quotas.rule(admission)
                verdicts.append(verdict)
        refused = [v for v in verdicts if not v.allowed]
        try:
            self._record(admission, verdicts, refused)
        except AuditError as e:
            if hold is not None:
                hold.release()
            if shared is not None and hold_as is not None and not refused:
                await shared.release(caller.tenant, hold_as)
            raise UnavailableError(
                f"admission needs the audit log, which failed: {e}", slug="audit-unavailable"
            ) from e
        if refused:
            raise AdmissionDeniedError(
                "; ".join(f"{v.judge}: {v.reason}" for v in refused),
                status=max(v.status for v in refused),
            )
        return _Admitted(
            admission.request, hold, self._wrap, egress_for(policy, admission.request.template)
        )

    def _record(
        self, admission: AdmissionRequest, verdicts: list[Verdict], refused: list[Verdict]
    ) -> None:
        if self.audit is None:
            return
        caller, request = admission.caller, admission.request
        self.audit.append(
            kind="admission",
            action="create_sandbox",
            outcome="denied" if refused else "allowed",
            tenant=caller.tenant,
            subject=caller.subject,
            method=caller.method.value,
            credential=caller.credential,
            resource={
                "template": request.template,
                "backend": request.backend.value,
                "vcpus": f"{request.resources.vcpus:g}",
                "memory_mib": str(request.resources.memory_mib),
                "network": str(request.network).lower(),
                "trust": request.trust.value,
                "secrets": ",".join(sorted(request.secrets)),
            },
            verdicts=[_verdict_doc(v) for v in verdicts],
            tags=admission.policy.audit.tags,
        )

    def readmit(
        self, record: SandboxRecord, caller: Principal, request: CreateSandboxRequest
    ) -> Admitted:
        """A sandbox that outlived a restart is taken back: no judge sits again (each
        did when it was created, and one that cannot answer now must not end it); its
        quota share is held again, whatever the quota says now."""
        policy = self.policy(caller.tenant)
        request = resolve(request, policy=policy_defaults(policy, request.template))
        admission = AdmissionRequest(caller=caller, request=request, policy=policy)
        hold = None if self.shared is not None else self.quotas.hold(admission, record.id)
        return _Admitted(request, hold, self._wrap, egress_for(policy, request.template))

    def ended(self, record: SandboxRecord) -> None:
        self.quotas.ended(record.tenant, record.id)
