"""The node agent's `RuntimeProvider` over this host: backends from the selector
(`tartarus.runtime.selector`), root filesystems from the template store (Erebus).

The doctor's report is taken once, when the first sandbox needs a backend (it runs real
probes: a KVM guest, a runsc container), then reused. One `Runtime` per backend lives
as long as the server; backends keep their per-sandbox files under
`RUNTIME_DIR/sandboxes`, which this server owns (one server per runtime dir), so
reaping there after a crash touches nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import anyio
import msgspec

from tartarus.api.types import CreateSandboxRequest
from tartarus.config import Settings
from tartarus.host.doctor import BackendVerdict, DoctorReport, run_doctor
from tartarus.images import TemplateStore
from tartarus.images.errors import TemplateNotFoundError
from tartarus.images.store import TemplateInfo, TemplateManifest
from tartarus.network.namespaces import SandboxNetworks
from tartarus.node.admission import TemplateDefaults
from tartarus.runtime.base import BackendUnavailableError, Runtime, Sandbox
from tartarus.runtime.selector import make_runtime, select_backend
from tartarus.runtime.types import Backend, SandboxSpec

log = logging.getLogger(__name__)

# Backends whose leftovers are reaped after a crash (wasm sandboxes die with us).
REAPED = (Backend.JAIL, Backend.GVISOR, Backend.MICROVM)


def owner_of(sandbox_id: str) -> str:
    """The blob-store owner that keeps a sandbox's template files alive while it runs."""
    return f"sandbox:{sandbox_id}"


class HostRuntimes:
    """`only`: the backends this host may use (a node agent's `--backend`); the others
    count as unavailable, so `auto` never picks one the node did not offer."""

    def __init__(
        self, settings: Settings, *, only: Sequence[Backend] = (), outlive_server: bool = True
    ) -> None:
        self.settings = settings
        # Whether sandboxes run on when the server dies, for the next one to take back.
        self.outlive_server = outlive_server
        self.templates = TemplateStore(settings)
        self._only = frozenset(b.value for b in only)
        self._report: DoctorReport | None = None
        self._report_lock = anyio.Lock()
        self._runtimes: dict[Backend, Runtime] = {}

    async def report(self) -> DoctorReport:
        async with self._report_lock:
            if self._report is None:
                report = await anyio.to_thread.run_sync(run_doctor, self.settings)
                if self._only:
                    report = msgspec.structs.replace(
                        report,
                        backends=[
                            b
                            if b.name in self._only
                            else BackendVerdict(b.name, False, "not offered by this node")
                            for b in report.backends
                        ],
                    )
                self._report = report
            return self._report

    def runtime(self, backend: Backend) -> Runtime:
        runtime = self._runtimes.get(backend)
        if runtime is None:
            runtime = self._runtimes[backend] = make_runtime(
                backend, self.settings, outlive_server=self.outlive_server
            )
        return runtime

    def networks(self) -> list[SandboxNetworks]:
        """The network layer of each backend in use that has one (jail, gvisor)."""
        return [
            networks
            for runtime in self._runtimes.values()
            if isinstance(networks := getattr(runtime, "networks", None), SandboxNetworks)
        ]

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        backend, reasons = select_backend(spec, await self.report())
        return self.runtime(backend), "; ".join(reasons)

    async def prepare(
        self, spec: SandboxSpec, backend: Backend
    ) -> tuple[SandboxSpec, TemplateManifest]:
        """Builds (or finds) the template and pins its files for this sandbox."""
        resolved = await self.templates.resolve(
            spec.template, ext4=backend is Backend.MICROVM, owner=owner_of(spec.id)
        )
        manifest = resolved.manifest
        spec = msgspec.structs.replace(
            spec, rootfs=resolved.rootfs, env={**manifest.env, **spec.env}
        )
        return spec, manifest

    async def release(self, sandbox_id: str) -> None:
        await self.templates.release(owner_of(sandbox_id))

    async def reattach(self, spec: SandboxSpec) -> tuple[Runtime, Sandbox] | None:
        """The running sandbox `spec` names, left by a server that died, if its backend
        can re-attach to it; None if it cannot or the sandbox is gone."""
        try:
            runtime = self.runtime(spec.backend)
        except BackendUnavailableError:
            return None
        sandbox = await runtime.reattach(spec)
        return None if sandbox is None else (runtime, sandbox)

    async def reap_all(self, keep: Mapping[Backend, AbstractSet[str]] | None = None) -> set[str]:
        """Reaps every backend's leftovers but those of the sandboxes `keep` lists for it."""
        reaped: set[str] = set()
        for backend in REAPED:
            try:
                runtime = self.runtime(backend)
                reaped.update(await runtime.reap(keep=set((keep or {}).get(backend, ()))))
            except BackendUnavailableError:
                continue
            except Exception:
                log.exception("reaping leftovers of the %s backend failed", backend.value)
        return reaped

    async def list_templates(self) -> list[TemplateInfo]:
        return await self.templates.list()

    async def template(self, name: str) -> TemplateInfo:
        return await self.templates.inspect(name)

    def defaults_for(self, request: CreateSandboxRequest) -> TemplateDefaults | None:
        """The template's own resources and timeout for a create, from its definition
        (no build needed), to count in admission; None for a restore (the snapshot
        decides) or a name no template has (creating it fails later, as before)."""
        if request.from_snapshot:
            return None
        try:
            template = self.templates.definition(request.template)
        except TemplateNotFoundError:
            return None
        return TemplateDefaults(
            resources=template.resources,
            timeout_s=template.timeout_s,
            on_timeout=template.on_timeout,
            auto_pause_after_s=template.auto_pause_after_s,
            stop_grace_s=template.stop_grace_s,
        )

    async def describe(self) -> dict[str, str]:
        report = await self.report()
        return {
            b.name: ("available" if b.available else "unavailable") + f": {b.reason}"
            for b in report.backends
        }
