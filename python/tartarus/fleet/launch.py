"""Starts the two fleet processes, an API server over shared state (`serve --state`) and a
node agent (`tartarus agent`), and a single-host `tartarus serve`: all three are
`tartarus serve` with plugins (every one serves `/metrics`)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet

import anyio
import msgspec

from tartarus import __version__
from tartarus.auth.tls import client_context
from tartarus.config import Settings
from tartarus.endpoint import Endpoint
from tartarus.errors import ConfigError
from tartarus.fleet.coordinator import Coordinator
from tartarus.fleet.host_metrics import CountingStore, HostMetrics, MetricsPlugin
from tartarus.fleet.host_usage import host_cpus, host_memory_mib
from tartarus.fleet.join_credentials import JoinCredentials
from tartarus.fleet.node_agent import AgentOptions, NodeAgent, Outbox, ReportingStore
from tartarus.fleet.routes import FleetPlugin
from tartarus.fleet.state import FleetState, open_state
from tartarus.node.provider import HostRuntimes
from tartarus.runtime.base import BackendUnavailableError, Runtime, Sandbox
from tartarus.runtime.types import Backend, SandboxSpec
from tartarus.scheduling.nodes import GENERAL_POOL, NodeCapacity, NodeSpec, Taint
from tartarus.server.serve import ServeOptions, serve

log = logging.getLogger(__name__)

# Grace between SIGTERM and the kill at a sandbox's deadline on a node: none, Alecto
# kills at once (within a second of the timeout, teardown included).
TIMEOUT_GRACE_S = 0.0


class FleetBackends(HostRuntimes):
    """The runtimes of an API server that runs no sandboxes itself: it describes the
    fleet's backends and refuses to create anything locally (templates still resolve
    here, for `/v1/templates`)."""

    def __init__(self, settings: Settings, state: FleetState) -> None:
        super().__init__(settings)
        self._state = state

    async def select(self, spec: SandboxSpec) -> tuple[Runtime, str]:
        raise BackendUnavailableError(
            "this API server schedules sandboxes on node agents and runs none itself"
        )

    async def reattach(self, spec: SandboxSpec) -> tuple[Runtime, Sandbox] | None:
        return None

    async def reap_all(self, keep: Mapping[Backend, AbstractSet[str]] | None = None) -> set[str]:
        return set()

    async def describe(self) -> dict[str, str]:
        counts: dict[str, int] = {}
        for node in await self._state.registry.nodes():
            for backend in node.spec.capacity.backends:
                counts[backend.value] = counts.get(backend.value, 0) + 1
        return {name: f"available on {n} node(s)" for name, n in sorted(counts.items())}


async def serve_fleet(
    settings: Settings,
    options: ServeOptions,
    state_url: str,
    *,
    on_ready: Callable[[list[Endpoint]], None] | None = None,
    stop: anyio.Event | None = None,
) -> None:
    fleet = settings.fleet
    async with open_state(
        state_url, lanes=fleet.lanes, inbox=fleet.inbox, heartbeat_ttl_s=fleet.heartbeat_ttl_s
    ) as state:
        await state.ping()
        tls = settings.auth.tls
        coordinator = Coordinator(
            state,
            fleet,
            join_token=options.api_key or "",
            # Nodes that serve https have certificates from the fleet's CA.
            node_tls=client_context(tls.client_ca) if tls and tls.client_ca else None,
        )
        await serve(
            settings,
            options,
            provider=FleetBackends(settings, state),
            plugins=[FleetPlugin(coordinator), MetricsPlugin(coordinator.metrics)],
            on_ready=on_ready,
            stop=stop,
        )


async def serve_host(
    settings: Settings,
    options: ServeOptions,
    *,
    on_ready: Callable[[list[Endpoint]], None] | None = None,
) -> None:
    """A single-host `tartarus serve`, with its host's metrics at `/metrics`."""
    metrics = HostMetrics()
    await serve(
        settings,
        options,
        plugins=[MetricsPlugin(metrics)],
        open_store=lambda path: CountingStore(path, metrics),
        on_ready=on_ready,
    )


def node_id(settings: Settings, given: str | None) -> str:
    """The node's name: given, or made once and kept in the state dir (a restarted agent
    is the same node, so the fleet can tell it which sandboxes it still counts on)."""
    if given:
        return given
    path = settings.state_dir / "node-id"
    if path.is_file():
        return path.read_text().strip()
    made = f"node-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(made + "\n")
    return made


async def available_backends(provider: HostRuntimes) -> list[Backend]:
    described = await provider.describe()
    return [Backend(name) for name, verdict in described.items() if verdict.startswith("available")]


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `tartarus agent` is told on its command line."""

    join: list[str]
    credentials: JoinCredentials
    # HOST:PORT of the node's own API (exec, files and logs are forwarded there).
    listen: str
    # The URL API servers use to reach it (default: the listening address).
    advertise: str | None = None
    node_id: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    taints: list[Taint] = msgspec.field(default_factory=list)
    pool: str = GENERAL_POOL
    vcpus: float | None = None
    memory_mib: int | None = None
    max_sandboxes: int = 1000
    # Default: every backend the doctor finds usable here.
    backends: list[Backend] = msgspec.field(default_factory=list)
    concurrency: int = 8
    drain_timeout_s: float = 30.0
    grace_s: float = 10.0


async def run_agent(
    settings: Settings,
    config: AgentConfig,
    *,
    on_ready: Callable[[list[Endpoint]], None] | None = None,
    stop: anyio.Event | None = None,
) -> None:
    config.credentials.check()
    # The key API servers use on this node's own API: the fleet's token, or (an agent
    # that joins by certificate knows none) one made now and handed over at the join.
    token = config.credentials.token
    node_key = token or secrets.token_urlsafe(32)
    named = config.credentials.certificate_name()
    if named is not None and config.node_id not in (None, named):
        raise ConfigError(
            f"--node-id {config.node_id} differs from the certificate's name {named}: "
            "an agent joins as the node its certificate names"
        )
    # The fleet fails a node's sandboxes when its heartbeats stop and places the work
    # elsewhere: they end with the node agent, and a restarted one reaps what is left.
    provider = HostRuntimes(settings, only=config.backends, outlive_server=False)
    backends = config.backends or await available_backends(provider)
    spec = NodeSpec(
        id=node_id(settings, config.node_id or named),
        address=config.advertise or "",
        capacity=NodeCapacity(
            vcpus=config.vcpus or host_cpus(),
            memory_mib=config.memory_mib or host_memory_mib(),
            backends=backends,
            max_sandboxes=config.max_sandboxes,
        ),
        labels=config.labels,
        taints=config.taints,
        pool=config.pool,
        version=__version__,
        access_key="" if token else node_key,
    )
    outbox = Outbox()
    metrics = HostMetrics(spec.id, spec.pool)
    metrics.event_sinks.append(outbox)
    agent = NodeAgent(
        AgentOptions(
            join=config.join,
            credentials=config.credentials,
            concurrency=config.concurrency,
            drain_timeout_s=config.drain_timeout_s,
            limits=settings.fleet.limits,
        ),
        spec,
        outbox,
    )

    def announce(endpoints: list[Endpoint]) -> None:
        tcp = next(e for e in endpoints if e.kind == "tcp")
        if not config.advertise and tcp.host in ("0.0.0.0", "::"):  # noqa: S104
            raise ConfigError(
                "listening on every address: say where API servers reach this node with "
                "--advertise http://HOST:PORT"
            )
        agent.listening(config.advertise or tcp.url)
        if on_ready is not None:
            on_ready(endpoints)

    await serve(
        settings,
        ServeOptions(
            tcp=config.listen,
            api_key=node_key,
            grace_s=config.grace_s,
            socket=settings.runtime_dir / f"agent-{spec.id}.sock",
        ),
        provider=provider,
        plugins=[agent, MetricsPlugin(metrics)],
        open_store=lambda path: ReportingStore(path, metrics, outbox, spec.id),
        timeout_grace_s=TIMEOUT_GRACE_S,
        reattach=False,
        on_ready=announce,
        stop=stop,
    )
