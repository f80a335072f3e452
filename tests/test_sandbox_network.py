"""Sandbox networks (Styx) end to end on the jail and gVisor backends: real network
namespaces, veth links, the eBPF filter (and, in a second run of each reachability test,
the nftables fallback) and TCP connections.

The test builds its own small "internet": a network namespace joined to the host by a
veth pair it routes (198.18.0.0/15, the benchmarking range, so nothing real answers),
running TCP servers on a public-looking address, on the metadata address
169.254.169.254 and on a private address (host routes send those two there too, so
only the sandbox rules keep them out of reach). Traffic goes only to loopback and to
namespaces the test makes. Every test checks that what it made is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tartarus.enforcement.egress_drops import EgressDropWatcher
from tartarus.enforcement.records import Fury
from tartarus.fleet.host_metrics import HostMetrics
from tartarus.host.doctor import DoctorReport
from tartarus.network.ebpf import EbpfEnforcer
from tartarus.network.namespaces import (
    NETNS_DIR,
    NETNS_PREFIX,
    SandboxNetwork,
    SandboxNetworks,
)
from tartarus.network.nftables import LINK_PREFIX, NftablesEnforcer, nft
from tartarus.network.settings import EnforcerChoice, NetworkSettings
from tartarus.runtime.base import Runtime, Sandbox
from tartarus.runtime.gvisor import GvisorRuntime, GvisorSandbox
from tartarus.runtime.jail import JailRuntime, JailSandbox
from tartarus.runtime.types import Backend, ExecRequest, Resources, SandboxSpec
from tests.conftest import require_binary, require_root
from tests.support.backends import LINUX_BACKENDS, available_backend
from tests.support.images import shared_template
from tests.support.internet import BULK_BYTES, METADATA, Internet, built_internet, run
from tests.support.server import end_what_outlived, running_server, server_env, start_server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    require_root()
    require_binary("nft")
    with built_internet() as inet:
        yield inet


@pytest.fixture(scope="module")
def python_rootfs() -> Path:
    """The built-in `python` template's root (built once per machine, shared)."""

    return shared_template("python", ext4=False).rootfs


@pytest.fixture(params=LINUX_BACKENDS, ids=lambda b: b.value)
def backend(request: pytest.FixtureRequest, doctor_report: DoctorReport) -> Backend:
    return available_backend(request, doctor_report)


@pytest.fixture(params=[EnforcerChoice.EBPF, EnforcerChoice.NFTABLES], ids=str)
def enforcer(request: pytest.FixtureRequest) -> EnforcerChoice:
    """Each reachability test runs with the eBPF filter and again with the nftables
    fallback: both must enforce the same rules."""
    choice: EnforcerChoice = request.param
    if choice is EnforcerChoice.EBPF and (reason := EbpfEnforcer.probe()) is not None:
        pytest.skip(f"the eBPF filter does not load here: {reason}")
    return choice


@pytest.fixture
async def runtime(
    backend: Backend, enforcer: EnforcerChoice, tmp_path: Path
) -> AsyncIterator[Runtime]:
    settings = NetworkSettings(enforcer=enforcer)
    rt: Runtime = (
        JailRuntime(tmp_path / "state", network=settings)
        if backend is Backend.JAIL
        else GvisorRuntime(tmp_path / "state", network=settings)
    )
    expected = EbpfEnforcer if enforcer is EnforcerChoice.EBPF else NftablesEnforcer
    assert isinstance(networks_of(rt).enforcer, expected)
    yield rt
    await rt.reap(set())
    if isinstance(rt, JailRuntime):
        rt.remove_cgroup_scope()
    await assert_scope_clean(networks_of(rt))


def networks_of(rt: Runtime) -> SandboxNetworks:
    assert isinstance(rt, JailRuntime | GvisorRuntime)
    return rt.networks


async def assert_scope_clean(networks: SandboxNetworks) -> None:
    """No namespace, lease, link or rule of this runtime is left."""
    await anyio.to_thread.run_sync(assert_no_namespace_lease_or_link, networks)
    leased = {lease.host_if for lease in networks.pool.leases()}
    rules = await networks.enforcer.attached()
    assert rules <= leased, f"rules without a lease: {rules - leased}"


def assert_no_namespace_lease_or_link(networks: SandboxNetworks) -> None:
    prefix = networks.netns_name("")
    left = [p.name for p in NETNS_DIR.glob(f"{prefix}*")] if NETNS_DIR.is_dir() else []
    assert left == [], f"network namespaces left: {left}"
    leases = [lease for lease in networks.pool.leases() if lease.scope == networks.scope]
    assert leases == [], f"leases left: {leases}"
    leased = {lease.host_if for lease in networks.pool.leases()}
    links = {p.name for p in Path("/sys/class/net").glob(f"{LINK_PREFIX}*")}
    assert links <= leased, f"links without a lease: {links - leased}"


def spec(name: str, **kw: Any) -> SandboxSpec:
    return SandboxSpec(
        id=name,
        resources=Resources(memory_mib=128, pids=64, disk_mib=256),
        **kw,
    )


@contextlib.asynccontextmanager
async def started(rt: Runtime, rootfs: Path, name: str, **kw: Any) -> AsyncIterator[Sandbox]:
    sb = await rt.create(spec(name, rootfs=rootfs, **kw))
    try:
        await sb.start()
        yield sb
    finally:
        await sb.kill()


def network_of(sb: Sandbox) -> SandboxNetwork | None:
    assert isinstance(sb, JailSandbox | GvisorSandbox)
    return sb.network


async def reaches(sb: Sandbox, address: str, port: int) -> bool:
    """True when a TCP connection from inside gets the server's greeting."""
    execution = await sb.exec(
        ExecRequest(shell=f"nc -w 2 {address} {port} </dev/null", timeout_s=20)
    )
    result = await execution.wait()
    return result.stdout.startswith(b"hello")


@contextlib.contextmanager
def host_listener(address: str = "127.0.0.1") -> Iterator[socket.socket]:
    with socket.socket() as listener:
        listener.bind((address, 0))
        listener.listen()
        listener.settimeout(0.2)
        yield listener


def nobody_came(listener: socket.socket) -> bool:
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


async def test_without_a_grant_only_loopback(
    runtime: Runtime, base_rootfs: Path, internet: Internet
) -> None:
    async with started(runtime, base_rootfs, "lo-only") as sb:
        with host_listener() as listener:
            port = listener.getsockname()[1]
            assert not await reaches(sb, "127.0.0.1", port)
            assert nobody_came(listener)
        assert not await reaches(sb, internet.address, internet.ports[0])
        out = (await (await sb.exec(ExecRequest(shell="ip -o link"))).wait()).stdout
        assert [line.split(":")[1].strip() for line in out.decode().splitlines()] == ["lo"]


async def test_a_grant_reaches_the_internet_not_the_host_nor_metadata(
    runtime: Runtime, base_rootfs: Path, internet: Internet
) -> None:
    async with started(runtime, base_rootfs, "granted", network=True) as sb:
        net = network_of(sb)
        assert net is not None and net.lease is not None
        assert await reaches(sb, internet.address, internet.ports[0])
        assert not await reaches(sb, METADATA, internet.ports[0])
        assert not await reaches(sb, internet.private, internet.ports[0])
        # The host: its loopback, and every address of its own (the link's end here).
        with host_listener("0.0.0.0") as listener:  # noqa: S104 - the test's own port
            port = listener.getsockname()[1]
            assert not await reaches(sb, "127.0.0.1", port)
            assert not await reaches(sb, net.lease.host_address, port)
            assert nobody_came(listener)
        drops = (await networks_of(runtime).drops())[sb.id]
        assert drops.denied >= 3, drops


async def test_an_allow_list_opens_only_what_it_names(
    runtime: Runtime, base_rootfs: Path, internet: Internet
) -> None:
    allowed, denied = internet.ports
    egress = [f"{internet.address}:{allowed}", f"{internet.private}/32"]
    async with started(runtime, base_rootfs, "listed", network=True, egress=egress) as sb:
        assert await reaches(sb, internet.address, allowed)
        assert not await reaches(sb, internet.address, denied)
        # Named, so the private range opens for that one address; metadata stays shut.
        assert await reaches(sb, internet.private, denied)
        assert not await reaches(sb, METADATA, allowed)


async def test_sandboxes_cannot_reach_each_other(
    runtime: Runtime, base_rootfs: Path, internet: Internet
) -> None:
    async with (
        started(runtime, base_rootfs, "alice", network=True) as alice,
        started(runtime, base_rootfs, "bob", network=True) as bob,
    ):
        await bob.exec(
            ExecRequest(shell="while true; do echo hello | nc -l -p 9000; done", background=True)
        )
        net = network_of(bob)
        assert net is not None and net.lease is not None
        await anyio.sleep(0.3)
        # Bob's server is up (he reaches it himself) and Alice cannot.
        assert await reaches(bob, "127.0.0.1", 9000)
        assert not await reaches(alice, net.lease.sandbox_address, 9000)
        assert await reaches(alice, internet.address, internet.ports[0])


async def test_the_host_may_open_connections_into_a_sandbox(
    runtime: Runtime, base_rootfs: Path
) -> None:
    """What the host opens (an inbound port, later) gets its answers back; the sandbox
    still opens nothing to the host."""
    async with started(runtime, base_rootfs, "served", network=True) as sb:
        await sb.exec(
            ExecRequest(shell="while true; do echo hello | nc -l -p 9000; done", background=True)
        )
        net = network_of(sb)
        assert net is not None and net.lease is not None
        address = net.lease.sandbox_address

        def greeting() -> bytes:
            for _ in range(50):
                try:
                    with socket.create_connection((address, 9000), timeout=2) as conn:
                        return conn.recv(64)
                except ConnectionRefusedError:
                    time.sleep(0.1)  # the server is not listening yet
            return b""

        assert (await anyio.to_thread.run_sync(greeting)).startswith(b"hello")
        with host_listener("0.0.0.0") as listener:  # noqa: S104 - the test's own port
            assert not await reaches(sb, net.lease.host_address, listener.getsockname()[1])
            assert nobody_came(listener)


async def test_spoofed_sources_are_dropped_and_counted(
    base_rootfs: Path, internet: Internet, tmp_path: Path
) -> None:
    """A packet from the link whose source is not the sandbox's address is dropped (the
    jail keeps no CAP_NET_ADMIN inside, so the test plays the sandbox from outside: it
    gives the sandbox's interface a second address and connects from it)."""
    rt = JailRuntime(tmp_path / "state")
    try:
        async with started(rt, base_rootfs, "spoof", network=True) as sb:
            net = network_of(sb)
            assert net is not None and net.lease is not None
            # Not the /30's broadcast address next door: Linux connects from the
            # interface's own address when a socket is bound to that.
            forged = "198.51.100.77"
            run("ip", "-n", net.netns, "addr", "add", f"{forged}/32", "dev", "eth0")
            connect = (
                "import socket,sys; s=socket.socket(); s.settimeout(2); s.bind((sys.argv[1], 0))\n"
                "try: s.connect((sys.argv[2], int(sys.argv[3]))); print('connected')\n"
                "except OSError as e: print('refused', e)"
            )
            out = run(
                "nsenter", f"--net={net.path}", sys.executable, "-c", connect,
                forged, internet.address, str(internet.ports[0]),
            )  # fmt: skip
            assert out.startswith("refused"), out
            drops = (await rt.networks.drops())[sb.id]
            assert drops.spoofed >= 1, drops
    finally:
        await rt.reap(set())
        rt.remove_cgroup_scope()
    await assert_scope_clean(rt.networks)


# Run as the sandbox's root: raw IP and packet sockets (forged packets, sniffing the
# link) need CAP_NET_RAW over the sandbox's namespace, which the sandbox does not hold.
RAW_SOCKETS = """
import socket
for family, kind, proto in ((socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                            (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
                            (socket.AF_PACKET, socket.SOCK_RAW, 0)):
    try:
        socket.socket(family, kind, proto).close()
        print("opened", family, kind, proto)
    except PermissionError as e:
        print("refused", e.errno)
"""


async def test_raw_sockets_need_a_capability_the_sandbox_lacks(
    runtime: Runtime, python_rootfs: Path
) -> None:
    async with started(runtime, python_rootfs, "raw", network=True) as sb:
        request = ExecRequest(argv=["python3", "-c", RAW_SOCKETS], timeout_s=60)
        result = await (await sb.exec(request)).wait()
        lines = result.stdout.decode().splitlines()
        assert result.exit.ok and len(lines) == 3, result
        assert all(line.startswith("refused") for line in lines), lines


async def test_bandwidth_is_capped_per_sandbox(
    backend: Backend, base_rootfs: Path, internet: Internet, tmp_path: Path
) -> None:
    """With `bandwidth_mbit` set, 2 MiB at 8 Mbit/s take about two seconds each way
    (unlimited, over a veth: milliseconds)."""
    settings = NetworkSettings(bandwidth_mbit=8)
    state = tmp_path / "state"
    rt: Runtime = (
        JailRuntime(state, network=settings)
        if backend is Backend.JAIL
        else GvisorRuntime(state, network=settings)
    )
    address = internet.address
    download = f"nc -w 10 {address} {internet.bulk_port} </dev/null | wc -c"
    # busybox nc half-closes at the end of its input (-q is not in every build).
    upload = f"head -c {BULK_BYTES} /dev/zero | nc -w 10 {address} {internet.sink_port}"
    try:
        async with started(rt, base_rootfs, "slow", network=True) as sb:
            for script in (download, upload):
                started_at = time.monotonic()
                result = await (await sb.exec(ExecRequest(shell=script, timeout_s=60))).wait()
                elapsed = time.monotonic() - started_at
                assert result.stdout.strip() == str(BULK_BYTES).encode(), (script, result)
                assert 1.5 < elapsed < 20, f"{script}: {elapsed:.2f} s for 2 MiB at 8 Mbit/s"
    finally:
        await rt.reap(set())
        if isinstance(rt, JailRuntime):
            rt.remove_cgroup_scope()
    await assert_scope_clean(networks_of(rt))


async def test_gvisor_snapshots_keep_the_network_and_restores_get_their_own(
    doctor_report: DoctorReport, base_rootfs: Path, internet: Internet, tmp_path: Path
) -> None:
    """A checkpoint restarts runsc in the same namespace (its address put back); a
    restore is a new sandbox with its own namespace, address and rules."""
    verdict = doctor_report.backend("gvisor")
    if not verdict.available:
        pytest.skip(f"gvisor cannot run here: {verdict.reason}")
    rt = GvisorRuntime(tmp_path / "state")
    allowed, denied = internet.ports
    try:
        async with started(rt, base_rootfs, "snap", network=True) as sb:
            info = await sb.snapshot(tmp_path / "snapshot")
            assert await reaches(sb, internet.address, denied)
            only = [f"{internet.address}:{allowed}"]
            restored = await rt.restore(
                info, spec("copy", rootfs=base_rootfs, network=True, egress=only)
            )
            try:
                mine, theirs = network_of(restored), network_of(sb)
                assert mine is not None and mine.lease is not None
                assert theirs is not None and theirs.lease is not None
                assert mine.lease.sandbox_address != theirs.lease.sandbox_address
                assert await reaches(restored, internet.address, allowed)
                assert not await reaches(restored, internet.address, denied)
            finally:
                await restored.kill()
    finally:
        await rt.reap(set())
    await assert_scope_clean(rt.networks)


async def test_the_resolver_answers_only_allowed_names(
    backend: Backend, base_rootfs: Path, internet: Internet, tmp_path: Path
) -> None:
    """The sandbox's resolver is on the host: it answers the names its egress list
    allows (and lets their addresses through), refuses the rest, and is the only
    resolver the sandbox reaches."""
    settings = NetworkSettings(dns_upstream=internet.address)
    state = tmp_path / "state"
    rt: Runtime = (
        JailRuntime(state, network=settings)
        if backend is Backend.JAIL
        else GvisorRuntime(state, network=settings)
    )
    allowed, denied = internet.ports
    egress = [f"allowed.test:{allowed}", f"*.wild.test:{allowed}"]

    async def lookup(sb: Sandbox, name: str, server: str = "") -> bool:
        script = f"nslookup {name} {server}"
        result = await (await sb.exec(ExecRequest(shell=script, timeout_s=30))).wait()
        return internet.address.encode() in result.stdout.split(b"Name:", 1)[-1]

    try:
        async with started(rt, base_rootfs, "dns", network=True, egress=egress) as sb:
            conf = await sb.read_file("/etc/resolv.conf")
            net = network_of(sb)
            assert net is not None and net.lease is not None
            assert f"nameserver {net.lease.host_address}".encode() in conf
            # Not resolved yet: the address is not allowed by itself.
            assert not await reaches(sb, internet.address, allowed)
            assert await lookup(sb, "allowed.test")
            assert await reaches(sb, internet.address, allowed)
            assert not await reaches(sb, internet.address, denied)
            assert await lookup(sb, "a.wild.test")
            assert not await lookup(sb, "wild.test")
            assert not await lookup(sb, "denied.test")
            # Only the host's resolver: the upstream itself is out of reach.
            assert not await lookup(sb, "allowed.test", internet.address)
            # Its TCP side (for answers too big for UDP) is open to the sandbox; the host's
            # other ports at that address are not. A TCP query the gate refuses: the name.
            tcp_query = (
                "printf '\\000\\035\\102\\102\\001\\000\\000\\001\\000\\000\\000\\000"
                "\\000\\000\\006denied\\004test\\000\\000\\001\\000\\001' | "
                f"nc -w 3 {net.lease.host_address} 53 | od -An -tx1 | tr -d ' \\n'"
            )
            result = await (await sb.exec(ExecRequest(shell=tcp_query, timeout_s=30))).wait()
            assert result.stdout.startswith(b"001d4242"), result
    finally:
        await rt.reap(set())
        if isinstance(rt, JailRuntime):
            rt.remove_cgroup_scope()
    await assert_scope_clean(networks_of(rt))


class Events:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def event(self, event: Any) -> None:
        self.events.append(event)


class NoManager:
    """The watcher only asks a manager for its live sandboxes' tenants."""

    def live_sandboxes(self) -> tuple[()]:
        return ()


async def test_drops_are_violation_events_and_metrics(
    base_rootfs: Path, internet: Internet, tmp_path: Path
) -> None:
    rt = JailRuntime(tmp_path / "state")
    metrics = HostMetrics("node-test")
    sink = Events()
    watcher = EgressDropWatcher(
        NoManager(),  # type: ignore[arg-type]
        lambda: [rt.networks],
        metrics,
        [metrics, sink],
    )
    try:
        async with started(rt, base_rootfs, "watched", network=True, egress=["192.0.2.0/24"]) as sb:
            await watcher.poll_once()
            assert not await reaches(sb, internet.address, internet.ports[0])
            events = await watcher.poll_once()
            assert [e.fury for e in events] == [Fury.POLICY_VIOLATION]
            assert events[0].sandbox_id == sb.id and events[0].value >= 1
            assert "its policy denies" in events[0].detail
            assert sink.events == events
            text = metrics.render().decode()
            assert (
                f'tartarus_sandbox_egress_dropped_packets{{reason="denied",sandbox="{sb.id}"}}'
                in (text)
            )
            assert (
                'tartarus_enforcement_actions_total{action="record",fury="policy-violation"}'
                in text
            )
        # An ended sandbox leaves the metrics.
        await watcher.poll_once()
        assert f'sandbox="{sb.id}"' not in metrics.render().decode()
    finally:
        await rt.reap(set())
        rt.remove_cgroup_scope()


async def test_two_hundred_cycles_leave_nothing_behind(runtime: Runtime, base_rootfs: Path) -> None:
    for i in range(200):
        sb = await runtime.create(spec(f"cycle{i}", rootfs=base_rootfs, network=True))
        await sb.start()
        await sb.kill()
        assert network_of(sb) is None
    await assert_scope_clean(networks_of(runtime))


async def test_reconcile_removes_what_a_crash_left(base_rootfs: Path, tmp_path: Path) -> None:
    """A server killed with SIGKILL leaves its sandboxes' namespaces, links, rules and
    leases; the next server's reap (its reconcile) removes them, and rules or links of
    any scope that have no lease."""
    state = tmp_path / "state"
    crashed = JailRuntime(state)
    sb = await crashed.create(spec("orphan", rootfs=base_rootfs, network=True))
    await sb.start()
    net = network_of(sb)
    assert net is not None and net.lease is not None
    link = anyio.Path(f"/sys/class/net/{net.lease.host_if}/ifindex")
    ifindex = await link.read_text()
    run("ip", "netns", "add", crashed.networks.netns_name("ghost"))
    stray = f"{LINK_PREFIX}99999"
    await nft(f"add chain inet tartarus egress_{stray}\nadd counter inet tartarus denied_{stray}\n")
    # A runtime whose state directory is gone left a lease whose namespace is gone too.
    pool = crashed.networks.pool
    lost = pool.take("zgone", "lost", "tt-zgone-lost", LINK_PREFIX)
    os.utime(pool.dir / str(lost.index), (1e9, 1e9))
    # The crash: the runtime is dropped without a kill (its process's sockets close
    # with it), and a new one takes over.
    crashed.networks.close_resolvers()
    restarted = JailRuntime(state)
    reaped = await restarted.reap(set())
    assert "orphan" in reaped
    assert stray not in await restarted.networks.enforcer.attached()
    assert lost not in list(pool.leases())
    assert isinstance(sb, JailSandbox) and sb.init_pid is not None
    for gone in (net.path, f"/proc/{sb.init_pid}"):
        assert not await anyio.Path(gone).exists(), f"{gone} survived the reap"
    # The reap gave the link's lease back and tests run in parallel: a link of the same
    # name may be another sandbox's by now. The orphan's own (its ifindex) must be gone.
    with contextlib.suppress(FileNotFoundError):
        assert await link.read_text() != ifindex, f"{link.parent} survived the reap"
    restarted.remove_cgroup_scope()
    await assert_scope_clean(restarted.networks)


def test_a_server_enforces_the_tenants_egress_and_reports_drops(
    internet: Internet, doctor_report: DoctorReport, tmp_path: Path
) -> None:
    """Through a real `tartarus serve`: the policy's `network.egress` reaches the
    sandbox's rules, and the drops show at `/metrics` as packets and violations."""
    verdict = doctor_report.backend("jail")
    if not verdict.available:
        pytest.skip(f"jail cannot run here: {verdict.reason}")
    allowed, denied = internet.ports
    policy = f'name: global\nspec: {{network: {{egress: ["{internet.address}/32:{allowed}"]}}}}\n'
    base = tmp_path / "srv"
    with running_server(base, env=server_env(base)) as server:
        applied = server.json("PUT", "/v1/policies/global", {"document": policy})
        assert applied.status in (200, 201), applied.body
        created = server.json(
            "POST",
            "/v1/sandboxes",
            {"template": "base", "backend": "jail", "network": True, "trust": "trusted"},
        )
        assert created.status == 201, created.body
        sandbox = created.json()["id"]

        def nc(port: int) -> str:
            cmd = f"nc -w 2 {internet.address} {port} </dev/null"
            reply = server.json("POST", f"/v1/sandboxes/{sandbox}/exec", {"cmd": cmd})
            assert reply.status == 200, reply.body
            return str(reply.json()["stdout"])

        assert nc(allowed).startswith("hello")
        assert nc(denied) == ""
        deadline = time.monotonic() + 10
        wanted = f'tartarus_sandbox_egress_dropped_packets{{reason="denied",sandbox="{sandbox}"}}'
        text = ""
        while time.monotonic() < deadline:
            text = server.raw("GET", "/metrics").body.decode()
            if wanted in text and 'fury="policy-violation"' in text:
                break
            time.sleep(0.3)
        assert wanted in text, text
        assert 'tartarus_enforcement_actions_total{action="record",fury="policy-violation"}' in text
        assert server.raw("DELETE", f"/v1/sandboxes/{sandbox}").status in (200, 202, 204)


def test_a_server_killed_with_sigkill_leaves_no_network_after_restart(
    doctor_report: DoctorReport, tmp_path: Path
) -> None:
    """kill -9 leaves the sandboxes running, with their namespaces, links, rules and
    leases; the next start takes them over, and they go when the sandboxes are
    deleted."""
    require_root()
    backends = [b for b in ("jail", "gvisor") if doctor_report.backend(b).available]
    if not backends:
        pytest.skip("neither the jail nor gvisor can run here (doctor)")
    base = tmp_path / "srv"
    try:
        server = start_server(base, env=server_env(base))
        ids = []
        for backend in backends:
            body = {"template": "base", "backend": backend, "network": True, "trust": "trusted"}
            created = server.json("POST", "/v1/sandboxes", body)
            assert created.status == 201, created.body
            ids.append(created.json()["id"])
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)

        def leftovers() -> list[str]:
            names = [p.name for i in ids for p in NETNS_DIR.glob(f"{NETNS_PREFIX}*-{i}")]
            leases = SandboxNetworks("any").pool.leases()
            return names + [f"lease {lease.index}" for lease in leases if lease.sandbox_id in ids]

        assert len(leftovers()) == 2 * len(ids), leftovers()
        with running_server(base, env=server_env(base)) as again:
            assert {i for i in ids if any(n.endswith(i) for n in leftovers())} == set(ids)
            for sandbox_id in ids:
                r = again.json("POST", f"/v1/sandboxes/{sandbox_id}/exec", {"cmd": "ip -o -4 addr"})
                assert r.status == 200 and "eth0" in r.json()["stdout"], r.body
                assert again.raw("DELETE", f"/v1/sandboxes/{sandbox_id}").status in (200, 202, 204)
            again.teardowns_done()
            assert leftovers() == []
    finally:
        end_what_outlived(base)
