"""The secrets check at admission: every secret reference must resolve now, so a typo or
a missing secret is a clear 422 at create instead of a failure at every exec. The values
are thrown away (and registered for redaction); commands get fresh ones at exec time."""

from __future__ import annotations

from tartarus.policy.verdicts import AdmissionRequest, Verdict
from tartarus.secrets.providers import SecretError, SecretResolver

NAME = "secrets"


class SecretsCheck:
    name = NAME

    def __init__(self, resolver: SecretResolver) -> None:
        self._resolver = resolver

    async def judge(self, admission: AdmissionRequest) -> Verdict:
        refs = admission.request.secrets
        if not refs:
            return Verdict(judge=NAME, allowed=True, reason="no secrets")
        try:
            await self._resolver.environment(admission.caller.tenant, refs)
        except SecretError as e:
            return Verdict(judge=NAME, allowed=False, reason=str(e), status=422)
        return Verdict(judge=NAME, allowed=True, reason=f"{len(refs)} secret(s) resolve")
