"""JWT bearer tokens from OIDC issuers: RS256, ES256 and EdDSA, keys from JWKS.

Checks, in order: the header's `alg` is one the issuer is configured for (so `none`
and HMAC algorithms never reach signature code, which rules out the HS256-with-the-
public-key confusion), the unverified `iss` names a configured issuer, the `kid` is in
that issuer's JWKS (fetched via OIDC discovery, cached, refetched at most once per
`jwks_min_refresh_s` when an unknown `kid` shows up), the key's own algorithm is the
header's, then PyJWT verifies the signature, `iss`, `aud`, `exp`, `nbf` and `iat` with
the configured clock skew.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import jwt
import msgspec

from tartarus.api.types import TENANT_PATTERN
from tartarus.auth.errors import AuthenticationError
from tartarus.auth.principal import AuthMethod, Principal
from tartarus.auth.rbac import Roles
from tartarus.auth.settings import AuthSettings, OidcIssuer

log = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 1 << 20
# Tokens that verified are remembered this long (never past their `exp`), so a client
# reusing its token pays for the signature check once, not on every request.
VERIFIED_CACHE_S = 60.0
VERIFIED_CACHE_SIZE = 4096
FETCH_TIMEOUT_S = 10.0
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"})
TENANT = re.compile(TENANT_PATTERN)


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


def is_secure_url(url: str) -> bool:
    """https, or http to a loopback address (tests, sidecars): credentials and keys
    never travel in clear over a network."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return parts.scheme == "http" and loopback


class IssuerKeys:
    """One issuer's signing keys by `kid`, from its JWKS."""

    def __init__(self, issuer: OidcIssuer, settings: AuthSettings) -> None:
        self.issuer = issuer
        self._ttl = settings.jwks_ttl_s
        self._min_refresh = settings.jwks_min_refresh_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = anyio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _get_json(self, url: str) -> Any:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            )
        if not is_secure_url(url):
            raise AuthenticationError(f"{url} must use https (http only on loopback)")
        async with self._session.get(url) as response:
            if response.status != 200:
                raise AuthenticationError(f"{url} answered HTTP {response.status}")
            raw = await response.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(raw) > MAX_DOCUMENT_BYTES:
                raise AuthenticationError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
            try:
                return msgspec.json.decode(raw)
            except msgspec.DecodeError as e:
                raise AuthenticationError(f"{url} did not send JSON: {e}") from e

    async def _refresh(self) -> None:
        discovery_url = self.issuer.discovery_url or (
            self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        discovery = await self._get_json(discovery_url)
        if not isinstance(discovery, dict) or discovery.get("issuer") != self.issuer.issuer:
            raise AuthenticationError(
                f"{discovery_url} describes issuer {discovery.get('issuer')!r}, "
                f"not {self.issuer.issuer!r}"
                if isinstance(discovery, dict)
                else f"{discovery_url} is not a discovery document"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise AuthenticationError(f"{discovery_url} has no jwks_uri")
        document = await self._get_json(jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []) if isinstance(document, dict) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            try:
                key = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError) as e:
                log.warning("skipping JWKS key %r of %s: %s", kid, self.issuer.issuer, e)
                continue
            if isinstance(kid, str) and key.algorithm_name in ASYMMETRIC:
                keys[kid] = key
        self._keys = keys
        self._fetched_at = time.monotonic()

    async def key(self, kid: str) -> jwt.PyJWK | None:
        now = time.monotonic()
        key = self._keys.get(kid)
        if key is not None and now - self._fetched_at < self._ttl:
            return key
        async with self._lock:
            # Another request may have refreshed while we waited for the lock.
            key = self._keys.get(kid)
            fresh = time.monotonic() - self._fetched_at
            if key is not None and fresh < self._ttl:
                return key
            if fresh >= self._min_refresh:
                try:
                    await self._refresh()
                except (aiohttp.ClientError, TimeoutError, AuthenticationError) as e:
                    log.warning("cannot fetch the keys of %s: %s", self.issuer.issuer, e)
                    # Keep serving cached keys while the issuer is unreachable.
                    return key
            return self._keys.get(kid)


class TokenVerifier:
    def __init__(self, settings: AuthSettings, roles: Roles) -> None:
        self._skew = settings.clock_skew_s
        self._roles = roles
        self._issuers = {i.issuer: IssuerKeys(i, settings) for i in settings.oidc}
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    @property
    def configured(self) -> bool:
        return bool(self._issuers)

    async def close(self) -> None:
        for keys in self._issuers.values():
            await keys.close()

    async def verify(self, token: str) -> Principal:
        cached = self._verified.get(token)
        if cached is not None:
            principal, until = cached
            if time.time() < until:
                self._verified.move_to_end(token)
                return principal
            del self._verified[token]
        principal, expires = await self._verify(token)
        self._verified[token] = (principal, min(expires, time.time() + VERIFIED_CACHE_S))
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise AuthenticationError(f"malformed token: {e}") from e
        keys = self._issuers.get(str(unverified.get("iss")))
        if keys is None:
            raise AuthenticationError("the token's issuer is not trusted by this server")
        issuer = keys.issuer
        alg = header.get("alg")
        if alg not in issuer.algorithms or alg not in ASYMMETRIC:
            raise AuthenticationError(
                f"token algorithm {alg!r} is not accepted; accepted: "
                f"{', '.join(a for a in issuer.algorithms if a in ASYMMETRIC)}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthenticationError("the token has no key id (kid)")
        key = await keys.key(kid)
        if key is None:
            raise AuthenticationError(f"unknown signing key {kid!r} for {issuer.issuer}")
        if key.algorithm_name != alg:
            raise AuthenticationError(
                f"key {kid!r} is a {key.algorithm_name} key; the token says {alg}"
            )
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=self._skew,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as e:
            raise AuthenticationError("the token has expired") from e
        except jwt.ImmatureSignatureError as e:
            raise AuthenticationError("the token is not valid yet (nbf/iat)") from e
        except jwt.InvalidAudienceError as e:
            raise AuthenticationError(f"the token is not for this audience: {e}") from e
        except jwt.PyJWTError as e:
            raise AuthenticationError(f"invalid token: {e}") from e
        return self._principal(issuer, claims, kid), float(claims["exp"])

    def _principal(self, issuer: OidcIssuer, claims: dict[str, Any], kid: str) -> Principal:
        tenant = claims.get(issuer.tenant_claim, issuer.default_tenant)
        if not isinstance(tenant, str) or not TENANT.match(tenant):
            raise AuthenticationError(
                f"the token has no valid {issuer.tenant_claim!r} claim (a tenant name)"
            )
        raw = claims.get(issuer.roles_claim)
        values = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        roles = tuple(dict.fromkeys(issuer.role_map.get(str(v), str(v)) for v in values)) or tuple(
            issuer.default_roles
        )
        return Principal(
            subject=f"{issuer.issuer}#{claims['sub']}",
            tenant=tenant,
            roles=roles,
            grants=self._roles.grants(roles),
            method=AuthMethod.JWT,
            credential=kid,
        )
