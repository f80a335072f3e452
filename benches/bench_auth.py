"""Cost of Cerberus and the Judges per request.

Over HTTP (loopback TCP, one keep-alive connection, a real `tartarus serve` each):
`GET /v1/sandboxes/{id}` (authentication, the permission check, the tenant's owner
lookup) with authentication off (the peer), with an API key, and with a JWT from a
local OIDC issuer; all three servers run in the same process of this bench, one after
the other. In process: the authenticator alone (key, JWT) and admission alone (the
Judges with a global and a tenant policy, Minos's hold and the audit entry in SQLite).

Run: `python -m benches.bench_auth` (results in benches/results/auth.json).
"""

from __future__ import annotations

import http.client
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from tests.support.auth import make_key, seed_sandboxes
from tests.support.oidc_issuer import Issuer, running_issuer
from tests.support.server import running_server, server_env

from benches.harness import Stats, measure, measure_async, report, write_result
from tartarus.api.types import CreateSandboxRequest
from tartarus.auth.authenticate import Authenticator, Presented
from tartarus.auth.keys import KeyStore
from tartarus.auth.rbac import default_roles
from tartarus.auth.settings import AuthSettings, OidcIssuer
from tartarus.policy.audit_log import AuditLog
from tartarus.policy.judges import Judges
from tartarus.policy.store import PolicyStore

HTTP_RUNS = 2000
LOCAL_RUNS = 5000
UNCACHED_RUNS = 1000
SANDBOX = "sb-00000000000000a1"
GLOBAL = "name: global\nspec: {resources: {max_sandboxes: 100000}, audit: {tags: [soc2]}}\n"
ACME = "name: acme\ntenant: acme\nspec: {resources: {max_vcpus: 100000}}\n"


def _http_stats(tcp_url: str, token: str | None) -> Stats:
    host, port = tcp_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def one() -> None:
        conn.request("GET", f"/v1/sandboxes/{SANDBOX}", headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    try:
        return measure(one, runs=HTTP_RUNS, warmup=200)
    finally:
        conn.close()


def _config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def http_bench(work: Path, issuer: Issuer) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    cases = {
        "off": '[auth]\nmode = "off"\n',
        "api_key": "",
        "jwt": f'[[auth.oidc]]\nissuer = "{issuer.url}"\naudience = "tartarus"\n',
    }
    for name, config in cases.items():
        base = work / name
        seed_sandboxes(base / "state", {SANDBOX: "acme"})
        env = server_env(base, TARTARUS_CONFIG=str(_config(work / f"{name}.toml", config)))
        with running_server(base, env=env) as server:
            assert server.tcp_url is not None
            token: str | None = None
            if name == "api_key":
                token = make_key(server, "acme", ["developer"])[1]
            elif name == "jwt":
                token = issuer.token("ec-1", exp=int(time.time()) + 3600)
            out[name] = _http_stats(server.tcp_url, token)
    return out


async def local_bench(work: Path, issuer: Issuer) -> dict[str, Stats]:
    keys = KeyStore(work / "auth.db")
    _, key = keys.create(tenant="acme", name="bench", roles=["developer"], created_by="bench")
    settings = AuthSettings(oidc=[OidcIssuer(issuer=issuer.url, audience="tartarus")])
    authenticator = Authenticator(settings, default_roles(), owner_uid=-1, keys=keys)
    token = issuer.token("ec-1", exp=int(time.time()) + 3600)
    policies = PolicyStore(work / "policy.db")
    policies.apply(GLOBAL, author="bench")
    policies.apply(ACME, author="bench")
    judges = Judges(policies=policies, audit=AuditLog(work / "audit.db"))
    caller = await authenticator.authenticate(Presented(bearer=key))
    request = CreateSandboxRequest(template="python")

    async def with_key() -> None:
        await authenticator.authenticate(Presented(bearer=key))

    async def with_jwt() -> None:
        await authenticator.authenticate(Presented(bearer=token))

    # Distinct tokens (another `jti` each): every call checks a signature.
    fresh = iter(
        [
            issuer.token("ec-1", exp=int(time.time()) + 3600, jti=str(i))
            for i in range(UNCACHED_RUNS + 50)
        ]
    )

    async def with_new_jwt() -> None:
        await authenticator.authenticate(Presented(bearer=next(fresh)))

    async def admission() -> None:
        admitted = await judges.admit(caller, request)
        admitted.release()

    try:
        return {
            "authenticate_api_key": await measure_async(with_key, runs=LOCAL_RUNS, warmup=50),
            "authenticate_jwt_cached": await measure_async(with_jwt, runs=LOCAL_RUNS, warmup=50),
            "authenticate_jwt_signature": await measure_async(
                with_new_jwt, runs=UNCACHED_RUNS, warmup=50
            ),
            "admission": await measure_async(admission, runs=LOCAL_RUNS, warmup=50),
        }
    finally:
        await authenticator.close()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as tmp:
        work = Path(tmp)
        with running_issuer(work / "issuer") as issuer:
            issuer.add_key("ec-1", "ES256")
            issuer.publish()
            http = http_bench(work, issuer)
            local = anyio.run(local_bench, work, issuer)
    lines = [
        report("GET sandbox, API key", http["api_key"], http["off"], "auth off"),
        report("GET sandbox, JWT (ES256)", http["jwt"], http["off"], "auth off"),
    ]
    for name, stats in local.items():
        line = f"{name}: p50 {stats.p50_ms * 1000:.1f} us p99 {stats.p99_ms * 1000:.1f} us"
        print(line)
        lines.append(line)
    results: dict[str, Any] = {
        "http_get_sandbox": {name: stats for name, stats in http.items()},
        "http_overhead_p50_ms": {
            name: round(http[name].p50_ms - http["off"].p50_ms, 4) for name in ("api_key", "jwt")
        },
        "http_overhead_p99_ms": {
            name: round(http[name].p99_ms - http["off"].p99_ms, 4) for name in ("api_key", "jwt")
        },
        "in_process": local,
        "summary": lines,
        "notes": (
            "HTTP: GET /v1/sandboxes/{id} over loopback TCP, one keep-alive connection, "
            f"{HTTP_RUNS} requests after 200 warm-up; the 'off' server authenticates no one "
            "but still runs the access middleware's permission and owner checks. In process: "
            f"{LOCAL_RUNS} calls. Admission = Rhadamanthus + Minos hold/release + one audit "
            "entry (SQLite WAL, no fsync). A verified JWT is remembered for up to 60 s (never "
            "past exp): the HTTP JWT case reuses one token, as clients do; "
            "authenticate_jwt_signature is the first use of a token (ES256 verification)."
        ),
    }
    print(f"wrote {write_result('auth', results)}")


if __name__ == "__main__":
    main()
