"""JWT bearer tokens against a real OIDC issuer (discovery + JWKS over HTTP, tokens
signed with its private keys): the three algorithms we accept, and every way a token
must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives import serialization

from tartarus.auth.errors import AuthenticationError
from tartarus.auth.principal import AuthMethod
from tartarus.auth.rbac import default_roles
from tartarus.auth.settings import AuthSettings, OidcIssuer
from tartarus.auth.tokens import TokenVerifier
from tests.support.auth import call, make_key
from tests.support.oidc_issuer import Issuer, running_issuer
from tests.support.server import running_server, server_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[Issuer]:
    with running_issuer(tmp_path / "issuer") as issuer:
        issuer.add_key("rsa-1", "RS256")
        issuer.add_key("ec-1", "ES256")
        issuer.add_key("ed-1", "EdDSA")
        issuer.publish()
        yield issuer


def settings(issuer: Issuer, **extra: object) -> AuthSettings:
    return AuthSettings(
        oidc=[
            OidcIssuer(
                issuer=issuer.url,
                audience="tartarus",
                role_map={"sandbox-users": "developer"},
            )
        ],
        clock_skew_s=60,
        jwks_min_refresh_s=float(extra.get("min_refresh", 0.0)),  # type: ignore[arg-type]
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to make these)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
async def test_accepts_rs256_es256_eddsa(issuer: Issuer, kid: str) -> None:
    verifier = TokenVerifier(settings(issuer), default_roles())
    try:
        principal = await verifier.verify(issuer.token(kid))
    finally:
        await verifier.close()
    assert principal.tenant == "acme"
    assert principal.roles == ("developer",)
    assert principal.method is AuthMethod.JWT
    assert principal.subject == f"{issuer.url}#alice"
    assert principal.allows("sandbox:create") and not principal.allows("admin:keys")


async def test_keys_are_cached(issuer: Issuer) -> None:
    verifier = TokenVerifier(settings(issuer), default_roles())
    try:
        for kid in ("rsa-1", "ec-1", "ed-1", "rsa-1"):
            await verifier.verify(issuer.token(kid))
    finally:
        await verifier.close()
    assert issuer.requests().count("/jwks") == 1


def _refusals(issuer: Issuer) -> dict[str, tuple[str, str]]:
    """Case → (token, what the refusal must say)."""
    now = int(time.time())
    rsa_public_pem = (
        issuer.keys["rsa-1"][1]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {
        "expired": (issuer.token(exp=now - 120, iat=now - 600, nbf=now - 600), "expired"),
        "not yet valid": (issuer.token(nbf=now + 600), "not valid yet"),
        "wrong audience": (issuer.token(aud="someone-else"), "audience"),
        "wrong issuer": (issuer.token(iss="http://127.0.0.1:1"), "issuer is not trusted"),
        "no expiry": (issuer.token(exp=None), "exp"),
        "no tenant": (issuer.token(tenant=None), "tenant"),
        "bad tenant": (issuer.token(tenant="../etc"), "tenant"),
        "alg none": (forge({"alg": "none", "kid": "rsa-1"}, issuer.claims(), None), "'none'"),
        "alg none, no kid": (forge({"alg": "none"}, issuer.claims(), None), "'none'"),
        "HS256 with the RSA public key": (
            forge({"alg": "HS256", "kid": "rsa-1"}, issuer.claims(), rsa_public_pem),
            "'HS256' is not accepted",
        ),
        "RS256 header on the EC key": (
            forge({"alg": "RS256", "kid": "ec-1"}, issuer.claims(), b"x"),
            "is a ES256 key",
        ),
        "unknown kid": (forge({"alg": "RS256", "kid": "nope"}, issuer.claims(), b"x"), "unknown"),
        "tampered claims": (_tamper(issuer.token(), tenant="globex"), "invalid token"),
        "garbage": ("eyJhbGciOi.eyJzdWIi.abc", "malformed"),
    }


def _tamper(token: str, **claims: object) -> str:
    header, payload, signature = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    doc.update(claims)
    return f"{header}.{b64(json.dumps(doc).encode())}.{signature}"


async def test_refuses_bad_tokens(issuer: Issuer) -> None:
    verifier = TokenVerifier(settings(issuer), default_roles())
    wrong = []
    try:
        for case, (token, reason) in _refusals(issuer).items():
            try:
                await verifier.verify(token)
            except AuthenticationError as e:
                if reason not in str(e):
                    wrong.append(f"{case}: refused for another reason: {e}")
                continue
            wrong.append(f"{case}: accepted")
    finally:
        await verifier.close()
    assert wrong == []


async def test_clock_skew_is_tolerated(issuer: Issuer) -> None:
    now = int(time.time())
    verifier = TokenVerifier(settings(issuer), default_roles())
    try:
        # Expired 30 s ago, not valid for 30 s more: both within the 60 s skew.
        await verifier.verify(issuer.token(exp=now - 30, iat=now - 300, nbf=now - 300))
        await verifier.verify(issuer.token(nbf=now + 30, iat=now + 30))
    finally:
        await verifier.close()


async def test_unknown_kid_refetches_then_refuses(issuer: Issuer) -> None:
    verifier = TokenVerifier(settings(issuer, min_refresh=3600), default_roles())
    try:
        await verifier.verify(issuer.token("rsa-1"))
        assert issuer.requests().count("/jwks") == 1
        issuer.add_key("rsa-2", "RS256")  # signed with a key the issuer never published
        for _ in range(5):
            with pytest.raises(AuthenticationError, match="unknown signing key"):
                await verifier.verify(issuer.token("rsa-2"))
        # Refetches are rate limited: a flood of unknown kids costs no more fetches.
        assert issuer.requests().count("/jwks") == 1
    finally:
        await verifier.close()


async def test_rotated_key_is_fetched_on_unknown_kid(issuer: Issuer) -> None:
    verifier = TokenVerifier(settings(issuer), default_roles())
    try:
        await verifier.verify(issuer.token("rsa-1"))
        issuer.add_key("rsa-2", "RS256")
        issuer.publish("rsa-2", "ec-1")  # rsa-1 retired, rsa-2 new
        principal = await verifier.verify(issuer.token("rsa-2"))
        assert principal.tenant == "acme"
        assert issuer.requests().count("/jwks") == 2
    finally:
        await verifier.close()


async def test_roles_from_claims_and_role_map(issuer: Issuer) -> None:
    verifier = TokenVerifier(settings(issuer), default_roles())
    try:
        mapped = await verifier.verify(issuer.token(roles=["sandbox-users", "unknown"]))
        spaced = await verifier.verify(issuer.token(roles="viewer tenant-admin"))
    finally:
        await verifier.close()
    assert mapped.allows("sandbox:exec") and not mapped.allows("admin:keys")
    assert spaced.roles == ("viewer", "tenant-admin") and spaced.allows("admin:keys")


async def test_unreachable_issuer_refuses(tmp_path: Path) -> None:
    dead = AuthSettings(oidc=[OidcIssuer(issuer="http://127.0.0.1:9", audience="tartarus")])
    verifier = TokenVerifier(dead, default_roles())
    token = forge({"alg": "RS256", "kid": "k"}, {"iss": "http://127.0.0.1:9"}, b"x")
    try:
        with anyio.fail_after(30), pytest.raises(AuthenticationError):
            await verifier.verify(token)
    finally:
        await verifier.close()


def test_server_accepts_tokens_and_refuses_bad_ones(issuer: Issuer, tmp_path: Path) -> None:
    config = tmp_path / "tartarus.toml"
    config.write_text(
        f'[[auth.oidc]]\nissuer = "{issuer.url}"\naudience = "tartarus"\n'
        'role_map = { "sandbox-users" = "developer" }\n'
    )
    env = server_env(tmp_path / "srv", TARTARUS_CONFIG=str(config))
    with running_server(tmp_path / "srv", env=env) as server:
        me = call(server, issuer.token("ed-1", roles=["sandbox-users"]), "GET", "/v1/auth/whoami")
        assert me.status == 200, me.body
        assert me.json()["tenant"] == "acme"
        assert me.json()["method"] == "jwt"
        assert "sandbox:create" in me.json()["permissions"]
        denied = call(server, issuer.token(), "GET", "/v1/auth/keys")
        assert denied.status == 403
        for case, (token, _) in _refusals(issuer).items():
            reply = call(server, token, "GET", "/v1/auth/whoami")
            assert reply.status == 401, (case, reply.body)
        # With an issuer configured, no credentials is no access (auth mode auto).
        assert call(server, None, "GET", "/v1/health").status == 401
        # API keys keep working beside tokens.
        _, key = make_key(server, "acme", ["viewer"])
        assert call(server, key, "GET", "/v1/sandboxes").status == 200
