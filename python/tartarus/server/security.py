"""Assembles Cerberus, the Judges, Themis, Aeacus and the secret providers for a server.

`Security.open` builds everything from the settings and the state dir:
`auth.db` (API keys), `policy.db` (policy versions), `audit.db` (the audit chain) and
`secrets.db` (the encrypted local secrets, keyed by `secrets.key`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import anyio
from aiohttp import web

from tartarus.auth.authenticate import Authenticator
from tartarus.auth.keys import KeyStore
from tartarus.auth.rbac import Roles, load_roles
from tartarus.config import Settings
from tartarus.policy.audit_log import AuditLog
from tartarus.policy.judges import Judges, load_plugins
from tartarus.policy.store import PolicyStore
from tartarus.secrets.inject import SecretInjector
from tartarus.secrets.judge import SecretsCheck
from tartarus.secrets.local_store import LocalSecretStore
from tartarus.secrets.providers import EnvProvider, FileProvider, SecretProvider, SecretResolver
from tartarus.secrets.redaction import redact
from tartarus.secrets.vault import VaultProvider

log = logging.getLogger(__name__)

# How often old audit entries are pruned (by the global policy's retention).
RETENTION_INTERVAL_S = 3600.0


@dataclass
class Security:
    authenticator: Authenticator
    roles: Roles
    judges: Judges
    keys: KeyStore
    policies: PolicyStore
    audit: AuditLog
    resolver: SecretResolver
    local_secrets: LocalSecretStore
    vault: VaultProvider | None = None

    @classmethod
    def open(cls, settings: Settings, *, owner_uid: int, static_key: str | None = None) -> Security:
        state = settings.state_dir
        roles = load_roles(settings.auth.roles_file)
        keys = KeyStore(state / "auth.db")
        policies = PolicyStore(state / "policy.db")
        local = LocalSecretStore(
            state / "secrets.db", settings.secrets.key_file or state / "secrets.key"
        )
        providers: list[SecretProvider] = [EnvProvider(), FileProvider(), local]
        vault = VaultProvider(settings.secrets.vault) if settings.secrets.vault else None
        if vault is not None:
            providers.append(vault)
        resolver = SecretResolver(providers)
        holder: list[Judges] = []

        def tags_for(tenant: str) -> list[str]:
            return holder[0].policy(tenant).audit.tags if holder else []

        audit = AuditLog(state / "audit.db", redact=redact, tags_for=tags_for)
        judges = Judges(
            policies=policies,
            audit=audit,
            plugins=[SecretsCheck(resolver), *load_plugins()],
            wrap=SecretInjector(resolver),
        )
        holder.append(judges)
        authenticator = Authenticator(
            settings.auth, roles, owner_uid=owner_uid, keys=keys, static_key=static_key
        )
        return cls(
            authenticator=authenticator,
            roles=roles,
            judges=judges,
            keys=keys,
            policies=policies,
            audit=audit,
            resolver=resolver,
            local_secrets=local,
            vault=vault,
        )

    async def close(self) -> None:
        await self.authenticator.close()
        if self.vault is not None:
            await self.vault.close()
        self.keys.close()
        self.policies.close()
        self.audit.close()
        self.local_secrets.close()

    def prune_audit(self) -> int:
        days = self.judges.policy("").audit.retention_days
        if days is None:
            return 0
        return self.audit.prune(time.time() - days * 86400.0)

    async def prune_forever(self) -> None:
        while True:
            try:
                removed = self.prune_audit()
                if removed:
                    log.info("audit retention removed %d entries", removed)
            except Exception:
                log.exception("pruning the audit log failed")
            await anyio.sleep(RETENTION_INTERVAL_S)


SECURITY = web.AppKey("security", Security)


def security_of(request: web.Request) -> Security:
    return request.app[SECURITY]
