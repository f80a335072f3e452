"""Turns what a connection presents into a `Principal`, or refuses it.

- the unix socket: the peer's uid (SO_PEERCRED) must be the server's owner, who is the
  platform operator (zero configuration stays zero configuration);
- `Authorization: Bearer tsk_...`: an API key; `Bearer eyJ...`: a JWT from a configured
  OIDC issuer; `Bearer <TARTARUS_API_KEY>`: the operator's bootstrap key;
- a verified client certificate (mTLS): a node agent, named by the certificate;
- nothing: refused, unless no credentials are configured at all (`mode = "auto"`) or
  authentication is off, where the caller is treated like the local owner.
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from tartarus.auth.errors import AuthenticationError, ForbiddenError
from tartarus.auth.keys import KeyStore, looks_like_key
from tartarus.auth.principal import DEFAULT_TENANT, AuthMethod, Principal
from tartarus.auth.rbac import Roles
from tartarus.auth.settings import AuthMode, AuthSettings
from tartarus.auth.tokens import TokenVerifier, looks_like_jwt

OPERATOR_ROLES = ("admin",)


class Presented(msgspec.Struct, frozen=True, kw_only=True):
    """What one request brings: transport facts and credentials."""

    peer_uid: int | None = None  # set on the unix socket
    bearer: str | None = None
    # The verified client certificate's subject common name (mTLS), and its serial.
    certificate_name: str | None = None
    certificate_serial: str = ""


class Authenticator:
    def __init__(
        self,
        settings: AuthSettings,
        roles: Roles,
        *,
        owner_uid: int,
        keys: KeyStore | None = None,
        static_key: str | None = None,
    ) -> None:
        self.settings = settings
        self.roles = roles
        self.owner_uid = owner_uid
        self.keys = keys
        self.tokens = TokenVerifier(settings, roles)
        # Compared as digests, so the comparison's length never depends on the input.
        self._static = None if not static_key else hashlib.sha256(static_key.encode()).digest()
        roles.check_known(settings.agent_roles)

    async def close(self) -> None:
        await self.tokens.close()

    def operator(self, subject: str, method: AuthMethod) -> Principal:
        return Principal(
            subject=subject,
            tenant=DEFAULT_TENANT,
            roles=OPERATOR_ROLES,
            grants=self.roles.grants(OPERATOR_ROLES),
            method=method,
        )

    def credentials_required(self) -> bool:
        if self.settings.mode is AuthMode.OFF:
            return False
        if self.settings.mode is AuthMode.REQUIRED:
            return True
        return (
            self._static is not None
            or self.tokens.configured
            or bool(self.settings.tls and self.settings.tls.client_ca)
            or (self.keys is not None and self.keys.any_active())
        )

    async def authenticate(self, presented: Presented) -> Principal:
        if presented.peer_uid is not None:
            if presented.peer_uid != self.owner_uid:
                raise ForbiddenError(
                    f"this server belongs to uid {self.owner_uid}, not to uid {presented.peer_uid}"
                )
            # A bearer on the socket is the caller asking for that key's (narrower)
            # rights: a proxy such as `tartarus mcp` acts as its own caller this way.
            if presented.bearer:
                return await self._bearer(presented.bearer)
            return self.operator(f"uid:{presented.peer_uid}", AuthMethod.LOCAL)
        if presented.bearer:
            return await self._bearer(presented.bearer)
        if presented.certificate_name is not None:
            return Principal(
                subject=f"agent:{presented.certificate_name}",
                tenant=DEFAULT_TENANT,
                roles=tuple(self.settings.agent_roles),
                grants=self.roles.grants(self.settings.agent_roles),
                method=AuthMethod.CERTIFICATE,
                credential=presented.certificate_serial,
            )
        if not self.credentials_required():
            return self.operator("anonymous", AuthMethod.ANONYMOUS)
        raise AuthenticationError(
            "this server needs credentials: send 'Authorization: Bearer <API key or token>'"
        )

    async def _bearer(self, token: str) -> Principal:
        if looks_like_key(token) and self.keys is not None:
            key = self.keys.verify(token)
            if key is None:
                raise AuthenticationError("unknown, expired or revoked API key")
            return Principal(
                subject=f"key:{key.name}",
                tenant=key.tenant,
                roles=tuple(key.roles),
                grants=self.roles.grants(key.roles),
                method=AuthMethod.API_KEY,
                credential=key.prefix,
            )
        if looks_like_jwt(token) and self.tokens.configured:
            return await self.tokens.verify(token)
        if self._static is not None and hmac.compare_digest(
            self._static, hashlib.sha256(token.encode()).digest()
        ):
            return self.operator("static-key", AuthMethod.STATIC_KEY)
        raise AuthenticationError("unknown credentials: not a valid API key or token")
