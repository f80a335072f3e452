"""Security policy (Rhadamanthus): which templates and backends a tenant may use,
whether it may have a network, which secrets it may reference, and combinations of
flags that are too dangerous together."""

from __future__ import annotations

from fnmatch import fnmatchcase

from tartarus.policy.verdicts import AdmissionRequest, Verdict
from tartarus.runtime.types import Backend, TrustLevel

NAME = "rhadamanthus"
# Secret providers that read the server's own environment and files.
HOST_PROVIDERS = ("env:", "file:")


def _matches(value: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(value, p) for p in patterns)


class SecurityJudge:
    name = NAME

    async def judge(self, admission: AdmissionRequest) -> Verdict:
        reasons = list(self.refusals(admission))
        if reasons:
            return Verdict(judge=NAME, allowed=False, reason="; ".join(reasons))
        return Verdict(judge=NAME, allowed=True, reason="the security policy allows it")

    def refusals(self, admission: AdmissionRequest) -> list[str]:
        request, policy, caller = admission.request, admission.policy, admission.caller
        security = policy.security
        out: list[str] = []
        rules = policy.templates
        if not _matches(request.template, rules.allowed) or _matches(
            request.template, rules.denied
        ):
            out.append(f"template {request.template!r} is not allowed for tenant {caller.tenant}")
        if request.backend is not Backend.AUTO and request.backend not in security.backends:
            allowed = ", ".join(b.value for b in security.backends) or "none"
            out.append(f"backend {request.backend.value} is not allowed (allowed: {allowed})")
        if request.network and not policy.network.allow:
            out.append("sandboxes of this tenant may not have a network")
        trusted = request.trust is TrustLevel.TRUSTED
        if trusted and not security.allow_trusted:
            out.append("trust=trusted is not allowed for this tenant")
        on_jail = request.backend is Backend.JAIL
        if on_jail and not trusted and not security.allow_untrusted_jail:
            out.append("untrusted work may not run on the jail backend (it shares the host kernel)")
        if (
            on_jail
            and not trusted
            and request.network
            and not security.allow_untrusted_jail_network
        ):
            out.append(
                "untrusted work with a network on the jail backend is too dangerous: use "
                "gvisor or microvm, or drop the network"
            )
        res = request.resources.to_runtime()
        timeout_s = request.resolved_timeout_s()
        if security.max_vcpus is not None and res.vcpus > security.max_vcpus:
            out.append(f"{res.vcpus:g} vCPUs is more than the {security.max_vcpus:g} allowed")
        if security.max_memory_mib is not None and res.memory_mib > security.max_memory_mib:
            out.append(f"{res.memory_mib} MiB is more than the {security.max_memory_mib} allowed")
        if security.max_timeout_s is not None and timeout_s > security.max_timeout_s:
            out.append(
                f"a timeout of {timeout_s:g} s is more than the "
                f"{security.max_timeout_s:g} s allowed"
            )
        for env, ref in sorted(request.secrets.items()):
            host = ref.startswith(HOST_PROVIDERS)
            if not (_matches(ref, policy.secrets.allowed) or (host and caller.cross_tenant)):
                out.append(f"secret reference {ref!r} (for {env}) is not allowed for this tenant")
        return out
