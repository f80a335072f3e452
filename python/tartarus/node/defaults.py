"""Where a sandbox's resources, timeout and backend come from when its create request
leaves them unset: resolved once, here, before the judges sit (so quotas judge what
the sandbox will get).

A field the request sets is kept as asked, whatever its value. A field it leaves unset
(absent, or null; `auto` for the backend) takes the first layer that sets it, in
`ORDER`:

1. the request;
2. the tenant's policy: its defaults for the template (`templates.defaults`);
3. the template: its own `resources` and `timeout_s` (from its definition);
4. the server: `SERVER` (1 vCPU, 512 MiB, 1024 MiB of disk, 256 processes, 300 s,
   `auto`).

docs/policy.md documents this order; a test checks that the two agree.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from tartarus.api.sandbox import Backend, Resources
from tartarus.api.types import DEFAULT_TIMEOUT_S, CreateSandboxRequest, ResourcesBody

RESOURCE_FIELDS: Final = ("vcpus", "memory_mib", "disk_mib", "pids")
ORDER: Final = ("request", "policy", "template", "server")


class Layer(msgspec.Struct, frozen=True, kw_only=True):
    """What one layer sets (None: nothing, the next layer decides)."""

    vcpus: float | None = None
    memory_mib: int | None = None
    disk_mib: int | None = None
    pids: int | None = None
    timeout_s: float | None = None
    backend: Backend | None = None


_SERVER_RESOURCES: Final = Resources()
SERVER: Final = Layer(
    vcpus=_SERVER_RESOURCES.vcpus,
    memory_mib=_SERVER_RESOURCES.memory_mib,
    disk_mib=_SERVER_RESOURCES.disk_mib,
    pids=_SERVER_RESOURCES.pids,
    timeout_s=DEFAULT_TIMEOUT_S,
)


def layer(
    resources: msgspec.Struct | None,
    timeout_s: float | None = None,
    backend: Backend | None = None,
) -> Layer:
    """A layer from anything with the resource fields (a request's, a policy's or a
    template's); `Backend.AUTO` counts as unset."""
    sizes = {name: getattr(resources, name, None) for name in RESOURCE_FIELDS}
    return Layer(
        **sizes,
        timeout_s=timeout_s,
        backend=None if backend is Backend.AUTO else backend,
    )


def resolve(
    request: CreateSandboxRequest,
    *,
    policy: Layer | None = None,
    template: Layer | None = None,
) -> CreateSandboxRequest:
    """`request` with every resource field, the timeout and (if a layer names one) the
    backend set, each from the first layer in `ORDER` that sets it."""
    given = {
        "request": layer(request.resources, request.timeout_s, request.backend),
        "policy": policy,
        "template": template,
        "server": SERVER,
    }
    layers = [given[name] for name in ORDER if given[name] is not None]

    def first(field: str) -> Any:
        return next((value for lay in layers if (value := getattr(lay, field)) is not None), None)

    return msgspec.structs.replace(
        request,
        resources=ResourcesBody(**{name: first(name) for name in RESOURCE_FIELDS}),
        timeout_s=first("timeout_s"),
        backend=first("backend") or Backend.AUTO,
    )


def resources(body: ResourcesBody | None) -> Resources:
    """The limits `body` asks for, the server's for what it leaves unset (for what has
    no tenant or template layer: a template's warm snapshot, a warm pool's match)."""
    request = CreateSandboxRequest(resources=body or ResourcesBody())
    return resolve(request).resources.to_runtime()
