"""Roles → permissions, loaded from YAML; deny by default.

A permission is `resource:action`. A role grants patterns: an exact permission,
`resource:*` (every action on the resource) or `*` (everything). A principal may do
what at least one of its roles grants, nothing else. Every route declares the
permission it needs (`RouteTable.route(permission=...)`); the server refuses to start
if one does not.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path
from typing import Annotated

import msgspec
import yaml
from msgspec import Meta

from tartarus.errors import ConfigError

SANDBOX_CREATE = "sandbox:create"
SANDBOX_READ = "sandbox:read"
SANDBOX_EXEC = "sandbox:exec"
SANDBOX_DELETE = "sandbox:delete"
TEMPLATE_MANAGE = "template:manage"
POLICY_MANAGE = "policy:manage"
ADMIN_KEYS = "admin:keys"  # API keys of the principal's tenant
ADMIN_AUDIT = "admin:audit"  # the audit log (of the principal's tenant)
ADMIN_TENANTS = "admin:tenants"  # act on every tenant: platform operators
NODE_AGENT = "node:agent"  # node agents joining the fleet (client certificates)

# A route marker, not a permission a role grants: any authenticated principal.
AUTHENTICATED = "authenticated"

PERMISSIONS: tuple[str, ...] = (
    SANDBOX_CREATE,
    SANDBOX_READ,
    SANDBOX_EXEC,
    SANDBOX_DELETE,
    TEMPLATE_MANAGE,
    POLICY_MANAGE,
    ADMIN_KEYS,
    ADMIN_AUDIT,
    ADMIN_TENANTS,
    NODE_AGENT,
)
ROUTE_PERMISSIONS: frozenset[str] = frozenset((*PERMISSIONS, AUTHENTICATED))

Pattern = Annotated[str, Meta(pattern=r"^(\*|[a-z]+:(\*|[a-z-]+))$")]
RoleName = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9-]*$")]


class RolesFile(msgspec.Struct, forbid_unknown_fields=True):
    roles: dict[RoleName, list[Pattern]]


def permits(grants: frozenset[str], permission: str) -> bool:
    if permission == AUTHENTICATED:
        return True
    if "*" in grants or permission in grants:
        return True
    resource = permission.partition(":")[0]
    return f"{resource}:*" in grants


class Roles:
    """The role set: name → granted patterns."""

    def __init__(self, roles: dict[str, list[str]], source: str) -> None:
        self.source = source
        self._roles = {name: frozenset(patterns) for name, patterns in roles.items()}
        for name, patterns in self._roles.items():
            for p in patterns:
                if p != "*" and not p.endswith(":*") and p not in PERMISSIONS:
                    raise ConfigError(
                        f"{source}: role {name!r} grants unknown permission {p!r}; "
                        f"known: {', '.join(PERMISSIONS)}"
                    )

    @property
    def names(self) -> list[str]:
        return sorted(self._roles)

    def grants(self, roles: tuple[str, ...] | list[str]) -> frozenset[str]:
        """The union of what `roles` grant; unknown role names grant nothing."""
        out: set[str] = set()
        for role in roles:
            out |= self._roles.get(role, frozenset())
        return frozenset(out)

    def check_known(self, roles: list[str] | tuple[str, ...]) -> None:
        unknown = [r for r in roles if r not in self._roles]
        if unknown:
            raise ConfigError(
                f"unknown role(s) {', '.join(unknown)}; roles in {self.source}: "
                f"{', '.join(self.names)}"
            )

    def within(self, roles: list[str] | tuple[str, ...], grants: frozenset[str]) -> bool:
        """Whether every permission `roles` grant is also granted by `grants` (so a
        principal can never hand out more than it holds)."""
        return expand(self.grants(roles)) <= expand(grants)


def expand(grants: frozenset[str]) -> frozenset[str]:
    """The concrete permissions that `grants` allow."""
    return frozenset(p for p in PERMISSIONS if permits(grants, p))


def parse_roles(text: str, source: str) -> Roles:
    try:
        doc = msgspec.convert(yaml.safe_load(text), RolesFile)
    except (yaml.YAMLError, msgspec.ValidationError) as e:
        raise ConfigError(f"{source}: not a roles file: {e}") from e
    return Roles(doc.roles, source)


@functools.cache
def default_roles() -> Roles:
    text = importlib.resources.files("tartarus.auth").joinpath("roles.yaml").read_text()
    return parse_roles(text, "the built-in roles")


def load_roles(path: Path | None) -> Roles:
    if path is None:
        return default_roles()
    try:
        return parse_roles(path.read_text(), str(path))
    except OSError as e:
        raise ConfigError(f"cannot read the roles file {path}: {e}") from e
