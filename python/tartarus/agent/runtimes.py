"""Where the node agent gets its backends and templates from.

`RuntimeProvider` is the seam between the node agent and the unified runtime: the
selector (`tartarus.runtime.selector`) picks a backend for a spec, and the image store
(`tartarus.images`, Erebus) resolves a template name to a root filesystem.
"""

from __future__ import annotations

from typing import Protocol

from tartarus.runtime.base import Runtime
from tartarus.runtime.types import SandboxSpec


class RuntimeProvider(Protocol):
    async def prepare(self, spec: SandboxSpec) -> SandboxSpec:
        """Fills in what the spec needs from the image store (its rootfs)."""
        ...

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        """The runtime for `spec` and why it was picked; raises
        BackendUnavailableError naming what is missing."""
        ...

    async def all_runtimes(self) -> list[Runtime]:
        """Every backend usable on this host (reaped after a restart)."""
        ...

    async def describe(self) -> dict[str, str]:
        """Each backend and whether it is usable here (for `/v1/version`)."""
        ...
