"""The authorisation matrix: every route, every role, its own or another tenant's
resource, generated from the server's RouteTable, so a new route is covered the day it
is added. Expectations come from the roles file and an independent matcher:

- a role that does not grant the route's permission gets 403, whatever the resource;
- a granted role asking for another tenant's resource gets exactly the 404 a missing
  one gets (same status, same problem, with the id swapped), unless it is an operator;
- otherwise the request gets past Cerberus (no 401, no 403, no tenancy 404).

Requests carry an unknown field / query parameter wherever the route reads one, so
they are refused with 422 after the access checks instead of changing anything.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tartarus.auth.rbac import ROUTE_PERMISSIONS, default_roles
from tartarus.server.app import operations
from tartarus.server.routing import JSON, Operation
from tests.support.auth import call, make_key, seed_sandboxes, seed_snapshots
from tests.support.server import Reply, Server, running_server, server_env

pytestmark = pytest.mark.timeout(300)

OWN, OTHER = "acme", "globex"
SANDBOX = {OWN: "sb-00000000000000a1", OTHER: "sb-00000000000000b2"}
SNAPSHOT = {OWN: "snap-00000000000000a1", OTHER: "snap-00000000000000b2"}
MISSING = {
    "id": "sb-ffffffffffffffff",
    "snapshot_id": "snap-ffffffffffffffff",
    "key_id": "ffffffffffff",
    "policy": "no-such-policy",
    "template": "no-such-template",
}
ROLES_FILE = yaml.safe_load(
    importlib.resources.files("tartarus.auth").joinpath("roles.yaml").read_text()
)["roles"]
ROLES = sorted(ROLES_FILE)


def granted(role: str, permission: str) -> bool:
    """Independent of tartarus.auth.rbac: exact, `resource:*` or `*`."""
    if permission == "authenticated":
        return True
    patterns = ROLES_FILE[role]
    return (
        "*" in patterns
        or permission in patterns
        or f"{permission.split(':', maxsplit=1)[0]}:*" in patterns
    )


@dataclass
class World:
    server: Server
    tokens: dict[tuple[str, str], str]  # (tenant, role) → token
    key_ids: dict[str, str]  # tenant → a key to act on


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("matrix")
    seed_sandboxes(base / "state", {SANDBOX[OWN]: OWN, SANDBOX[OTHER]: OTHER})
    seed_snapshots(base / "state", {SNAPSHOT[OWN]: OWN, SNAPSHOT[OTHER]: OTHER})
    with running_server(base, env=server_env(base)) as server:
        tokens = {
            (tenant, role): make_key(server, tenant, [role], f"{tenant}-{role}")[1]
            for tenant in (OWN, OTHER)
            for role in ROLES
        }
        key_ids = {t: make_key(server, t, ["viewer"], f"{t}-target")[0] for t in (OWN, OTHER)}
        policy = "name: global\nspec: {resources: {max_sandboxes: 100}}\n"
        assert server.json("PUT", "/v1/policies/global", {"document": policy}).status == 200
        yield World(server, tokens, key_ids)


def _path(op: Operation, world: World, tenant: str, *, missing: bool = False) -> str:
    path = op.document_path
    for param in op.path_params:
        if missing and param in MISSING:
            value = MISSING[param]
        elif param == "id":
            value = SANDBOX[tenant]
        elif param == "snapshot_id":
            value = SNAPSHOT[tenant]
        elif param == "key_id":
            value = world.key_ids[tenant]
        elif param == "policy":
            value = "global"
        elif param == "pid":
            value = "1"
        elif param == "port":
            value = "8000"
        elif param == "path":  # the rest of a proxied URL
            value = "index.html"
        elif param == "template":  # shared by every tenant
            value = "base"
        elif param == "context":  # a code context
            value = "default"
        else:
            pytest.fail(f"{op.operation_id}: the matrix does not know path parameter {param}")
        path = path.replace("{" + param + "}", value)
    return path + "?matrix-probe=1"


def _send(world: World, op: Operation, token: str | None, path: str) -> Reply:
    if op.body is not None and op.body_media == JSON:
        return call(world.server, token, op.method, path, {"matrix-probe": 1})
    return call(world.server, token, op.method, path, body=b"" if op.method != "GET" else None)


def _problem(reply: Reply) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(reply.body)
    except ValueError:
        return {}
    return value


def _resource_owner(op: Operation) -> str | None:
    """Whose resource the path names: a tenant's (`id`, `key_id`, `snapshot_id`), the
    platform's (`policy`), or none."""
    params = set(op.path_params)
    if params & {"id", "key_id", "snapshot_id"}:
        return "tenant"
    if "policy" in params:
        return "platform"
    return None


@pytest.mark.parametrize("op", operations(), ids=lambda op: op.operation_id)
def test_route_matrix(world: World, op: Operation) -> None:
    assert op.permission is not None
    failures: list[str] = []
    owner = _resource_owner(op)
    for role in ROLES:
        cross = granted(role, "admin:tenants")
        for target in (OWN, OTHER) if owner == "tenant" else (OWN,):
            reply = _send(world, op, world.tokens[(OWN, role)], _path(op, world, target))
            where = f"{role} on {'own' if target == OWN else 'other'}: {reply.status}"
            if not granted(role, op.permission):
                if reply.status != 403:
                    failures.append(f"{where}, expected 403 ({reply.body[:200]!r})")
                continue
            visible = cross or (owner == "tenant" and target == OWN) or owner is None
            if not visible:
                missing = _send(
                    world, op, world.tokens[(OWN, role)], _path(op, world, target, missing=True)
                )
                got, want = _problem(reply), _problem(missing)
                for param, value in (
                    ("id", SANDBOX[target]),
                    ("key_id", world.key_ids[target]),
                    ("snapshot_id", SNAPSHOT[target]),
                ):
                    for field in ("detail", "instance"):
                        if field in got:  # a HEAD answer has no body
                            got[field] = got[field].replace(value, MISSING[param])
                if reply.status != 404 or got != want:
                    failures.append(f"{where}, expected the missing-resource answer {want}: {got}")
                continue
            if reply.status in (401, 403):
                failures.append(f"{where}, expected to pass the access checks: {reply.body!r}")
            detail = str(_problem(reply).get("detail", ""))
            if reply.status == 404 and any(v in detail for v in SANDBOX.values()):
                failures.append(f"{where}, its own resource was hidden: {detail}")
    assert not failures, f"{op.method} {op.path} ({op.permission}):\n  " + "\n  ".join(failures)


@pytest.mark.parametrize("op", operations(), ids=lambda op: op.operation_id)
def test_route_needs_credentials(world: World, op: Operation) -> None:
    path = _path(op, world, OWN)
    for token in (None, "tsk_000000000000_" + "A" * 43, "not-a-key", "eyJ.eyJ.sig"):
        reply = _send(world, op, token, path)
        assert reply.status == 401, (token, reply.body)
        assert reply.headers.get("www-authenticate") == "Bearer"


def test_listings_show_only_the_callers_tenant(world: World) -> None:
    server = world.server
    mine = call(server, world.tokens[(OWN, "viewer")], "GET", "/v1/sandboxes").json()
    assert [s["id"] for s in mine["items"]] == [SANDBOX[OWN]]
    assert mine["items"][0]["tenant"] == OWN
    other = call(server, world.tokens[(OWN, "viewer")], "GET", f"/v1/sandboxes?tenant={OTHER}")
    assert other.status == 404
    everyone = call(server, world.tokens[(OWN, "admin")], "GET", "/v1/sandboxes").json()
    assert {s["id"] for s in everyone["items"]} == set(SANDBOX.values())
    keys = call(server, world.tokens[(OWN, "tenant-admin")], "GET", "/v1/auth/keys").json()
    assert keys["items"] and {k["tenant"] for k in keys["items"]} == {OWN}
    audit = call(server, world.tokens[(OWN, "tenant-admin")], "GET", "/v1/audit?limit=1000")
    assert audit.status == 200
    assert {e["tenant"] for e in audit.json()["items"]} <= {OWN}


def test_every_route_declares_a_known_permission() -> None:
    for op in operations():
        assert op.permission in ROUTE_PERMISSIONS, op.operation_id


def test_matrix_roles_file_is_the_shipped_one() -> None:
    # The matcher above reads the same file the server loads by default.
    assert default_roles().names == ROLES
