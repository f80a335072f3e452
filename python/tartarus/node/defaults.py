"""Where a sandbox's resources, timeout and backend come from when its create request
leaves them unset: resolved once, here, before the judges sit (so quotas judge what
the sandbox will get).

A field the request sets is kept as asked, whatever its value. A field it leaves unset
(absent, or null; `auto` for the backend) takes the first layer that sets it, in
`ORDER`:

1. the request;
2. the tenant's policy: its defaults for the template (`templates.defaults`);
3. the template: its own `resources`, `timeout_s`, `on_timeout`,
   `auto_pause_after_s` and `stop_grace_s` (from its definition);
4. the server: `SERVER` (1 vCPU, 512 MiB, 1024 MiB of disk, 256 processes, 300 s,
   `auto`, `kill` at the timeout, no auto-pause, no stop grace).

docs/policy.md documents this order; a test checks that the two agree.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from tartarus.api.sandbox import Backend, OnTimeout, Resources
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
    on_timeout: OnTimeout | None = None
    auto_pause_after_s: float | None = None
    stop_grace_s: float | None = None


_SERVER_RESOURCES: Final = Resources()
SERVER: Final = Layer(
    vcpus=_SERVER_RESOURCES.vcpus,
    memory_mib=_SERVER_RESOURCES.memory_mib,
    disk_mib=_SERVER_RESOURCES.disk_mib,
    pids=_SERVER_RESOURCES.pids,
    timeout_s=DEFAULT_TIMEOUT_S,
    on_timeout=OnTimeout.KILL,
    stop_grace_s=0.0,
)


def layer(
    resources: msgspec.Struct | None,
    timeout_s: float | None = None,
    backend: Backend | None = None,
    *,
    on_timeout: OnTimeout | None = None,
    auto_pause_after_s: float | None = None,
    stop_grace_s: float | None = None,
) -> Layer:
    """A layer from anything with the resource fields (a request's, a policy's or a
    template's); `Backend.AUTO` counts as unset."""
    sizes = {name: getattr(resources, name, None) for name in RESOURCE_FIELDS}
    return Layer(
        **sizes,
        timeout_s=timeout_s,
        backend=None if backend is Backend.AUTO else backend,
        on_timeout=on_timeout,
        auto_pause_after_s=auto_pause_after_s,
        stop_grace_s=stop_grace_s,
    )


def resolve(
    request: CreateSandboxRequest,
    *,
    policy: Layer | None = None,
    template: Layer | None = None,
) -> CreateSandboxRequest:
    """`request` with every resource field, the timeout, what the timeout does and (if
    a layer names them) the backend and the idle time before an auto-pause set, each
    from the first layer in `ORDER` that sets it."""
    given = {
        "request": layer(
            request.resources,
            request.timeout_s,
            request.backend,
            on_timeout=request.on_timeout,
            auto_pause_after_s=request.auto_pause_after_s,
            stop_grace_s=request.stop_grace_s,
        ),
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
        on_timeout=first("on_timeout"),
        auto_pause_after_s=first("auto_pause_after_s"),
        stop_grace_s=first("stop_grace_s"),
    )


def resources(body: ResourcesBody | None) -> Resources:
    """The limits `body` asks for, the server's for what it leaves unset (for what has
    no tenant or template layer: a template's warm snapshot, a warm pool's match)."""
    request = CreateSandboxRequest(resources=body or ResourcesBody())
    return resolve(request).resources.to_runtime()
