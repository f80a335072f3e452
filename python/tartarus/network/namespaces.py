"""Each sandbox's network namespace, its link to the host and its egress rules: made
before the sandbox starts, removed on every exit path, and reaped after a crash.

A namespace is `/run/netns/tt-<scope>-<sandbox>` (made in-process as `ip netns add`
makes one, by `tartarus._core.make_netns`, so `ip netns` lists it). Without a grant it
has loopback only. With one, a veth pair joins it to the host: `ttv<n>` on the host,
`eth0` inside, a /30 from the pool (host end first), the host end as the default route,
and the enforcer's rules (`choose_enforcer`) attached before the host end is up. Links
are routed, not bridged: each sandbox is alone on its segment, so it cannot ARP-spoof or
reach another sandbox except through the host's forward path, where the rules are.

`scope` keeps the runtimes of one host apart (each runtime reaps only its own).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

import anyio
import msgspec

from tartarus import _core
from tartarus.errors import TartarusError
from tartarus.network.dns import DnsGate, host_upstream
from tartarus.network.ebpf import EbpfEnforcer
from tartarus.network.egress import (
    Drops,
    EgressEnforcer,
    EgressRules,
    LinkAddresses,
    compile_rules,
)
from tartarus.network.leases import LINK_PREFIX_LEN, Lease, Pool
from tartarus.network.nftables import LINK_PREFIX, NftablesEnforcer
from tartarus.network.settings import EnforcerChoice, NetworkSettings
from tartarus.runtime.types import SandboxSpec

log = logging.getLogger(__name__)

NETNS_DIR: Final = Path("/run/netns")
NETNS_PREFIX: Final = "tt-"
# The sandbox's end of its link.
SANDBOX_IF: Final = "eth0"
IP_TIMEOUT_S: Final = 30.0
UNWRITTEN_LEASE_S: Final = 60.0
ORPHAN_LEASE_S: Final = 60.0


class NetworkSetupError(TartarusError):
    """A namespace, link or address could not be made; the message says which."""


class SandboxNetwork(msgspec.Struct, frozen=True, kw_only=True):
    """One sandbox's namespace, and its link when it was granted a network."""

    sandbox_id: str
    netns: str
    lease: Lease | None = None
    # The address of the sandbox's resolver on the host, when it has one: its
    # `/etc/resolv.conf` should name it (`resolv_conf`).
    resolver: str | None = None

    def resolv_conf(self) -> str | None:
        if self.resolver is None:
            return None
        return f"# The sandbox's resolver, on the host (Tartarus).\nnameserver {self.resolver}\n"

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.netns


async def _netlink(call: Callable[[], object], what: str) -> None:
    """Runs a blocking namespace or rtnetlink call of `tartarus._core` on a worker
    thread; its OSError becomes a NetworkSetupError saying `what`."""
    try:
        await anyio.to_thread.run_sync(call)
    except OSError as e:
        raise NetworkSetupError(f"{what}: {e}") from e


async def limit_bandwidth(netns: str, host_if: str, mbit: int) -> None:
    """Caps a link at `mbit` each way with a token bucket (tbf) at each end: the host
    end's shapes what reaches the sandbox, the sandbox end's what it sends (neither the
    jail, without CAP_NET_ADMIN, nor gVisor's sentry can change a host qdisc). Token
    buckets, not an ingress policer: this kernel has no tc actions."""
    # About 10 ms of traffic, and at least a few full-size packets.
    burst = max(32 << 10, mbit * 1_000_000 // 8 // 100)
    tbf = f"root tbf rate {mbit}mbit burst {burst} latency 50ms"
    for prefix, dev in (([], host_if), (["-n", netns], SANDBOX_IF)):
        command = ["tc", *prefix, "qdisc", "replace", "dev", dev, *tbf.split()]
        with anyio.fail_after(IP_TIMEOUT_S):
            result = await anyio.run_process(command, check=False)
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise NetworkSetupError(f"{' '.join(command)} failed: {detail[-800:]}")


def _host_links() -> set[str]:
    """Host ends of sandbox links that exist now."""
    return {p.name for p in Path("/sys/class/net").glob(f"{LINK_PREFIX}*")}


def _write_sysctl(path: str, value: str) -> None:
    current = Path(path).read_text().strip()
    if current != value:
        Path(path).write_text(value + "\n")


def choose_enforcer(settings: NetworkSettings) -> EgressEnforcer:
    """The enforcer `[network] enforcer` asks for: with `auto`, eBPF where its filter
    loads (blocking: it loads it), else nftables with a warning saying why."""
    pools = [settings.network]
    if settings.enforcer is EnforcerChoice.NFTABLES:
        return NftablesEnforcer(pools)
    reason = EbpfEnforcer.probe()
    if reason is None:
        return EbpfEnforcer(pools)
    if settings.enforcer is EnforcerChoice.EBPF:
        raise NetworkSetupError(f'[network] enforcer = "ebpf", but {reason}')
    log.warning("egress rules fall back to nftables: the eBPF filter does not load (%s)", reason)
    return NftablesEnforcer(pools)


class SandboxNetworks:
    """Namespaces and links of one runtime's sandboxes (`scope` names them)."""

    def __init__(
        self,
        scope: str,
        settings: NetworkSettings | None = None,
        *,
        enforcer: EgressEnforcer | None = None,
    ) -> None:
        self.scope = scope
        self.settings = settings or NetworkSettings()
        self.pool = Pool(self.settings.network, self.settings.leases_dir)
        self.enforcer = enforcer or choose_enforcer(self.settings)
        # Host interface -> sandbox id, for the links this runtime made and still has.
        self.links: dict[str, str] = {}
        # Host interface -> the resolver of its sandbox.
        self._resolvers: dict[str, DnsGate] = {}

    def netns_name(self, sandbox_id: str) -> str:
        return f"{NETNS_PREFIX}{self.scope}-{sandbox_id}"

    async def create(self, sandbox_id: str, rules: EgressRules | None) -> SandboxNetwork:
        """A new namespace for the sandbox; with `rules`, a link to the host that they
        govern. Half-made state is removed if any step fails."""
        name = self.netns_name(sandbox_id)
        if (NETNS_DIR / name).exists():
            # A leftover of an earlier sandbox of that id (a crash): start clean.
            await self.remove(SandboxNetwork(sandbox_id=sandbox_id, netns=name))
        net = SandboxNetwork(sandbox_id=sandbox_id, netns=name)
        try:
            # In-process, loopback up: ~1 ms against ~5 ms for two `ip` runs.
            make = functools.partial(_core.make_netns, NETNS_DIR, name)
            await _netlink(make, f"cannot make network namespace {name}")
            if rules is None:
                return net
            lease = await anyio.to_thread.run_sync(
                self.pool.take, self.scope, sandbox_id, name, LINK_PREFIX
            )
            net = msgspec.structs.replace(net, lease=lease)
            upstream = self._upstream()
            resolver = lease.host_address if upstream is not None else None
            net = msgspec.structs.replace(net, resolver=resolver)
            await self._link(lease, rules, resolver)
            if upstream is not None:
                await self._open_resolver(lease, rules, upstream)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.remove(net)
            raise
        self.links[lease.host_if] = sandbox_id
        return net

    async def reattach(self, spec: SandboxSpec) -> SandboxNetwork | None:
        """The namespace (and link, rules and lease) a server that died made for the
        sandbox, taken over as they are, its resolver opened again; None if its
        namespace is gone or a granted sandbox's lease is."""
        sandbox_id = spec.id
        name = self.netns_name(sandbox_id)
        if not (NETNS_DIR / name).exists():
            return None
        net = SandboxNetwork(sandbox_id=sandbox_id, netns=name)
        if not spec.network:
            return net
        rules = await anyio.to_thread.run_sync(compile_rules, spec.egress)
        leases = [
            lease
            for lease in self.pool.leases()
            if lease.scope == self.scope and lease.sandbox_id == sandbox_id
        ]
        if not leases:
            return None
        lease = leases[0]
        upstream = self._upstream()
        net = msgspec.structs.replace(
            net, lease=lease, resolver=lease.host_address if upstream is not None else None
        )
        if upstream is not None:
            await self._open_resolver(lease, rules, upstream)
        self.links[lease.host_if] = sandbox_id
        return net

    def _upstream(self) -> str | None:
        if not self.settings.dns:
            return None
        return self.settings.dns_upstream or host_upstream()

    async def _open_resolver(self, lease: Lease, rules: EgressRules, upstream: str) -> None:
        host_if = lease.host_if

        async def allow(name: int, records: list[tuple[str, int]]) -> None:
            await self.enforcer.allow_resolved(host_if, name, records, rules.names[name].ports)

        names = None if rules.any_name else list(enumerate(n.pattern for n in rules.names))
        gate = DnsGate(lease.host_address, upstream, names, allow)
        try:
            await gate.open()
        except OSError as e:
            # Failing beats going on: the rules already let the sandbox reach port 53
            # there, which would be whatever else holds it.
            raise NetworkSetupError(
                f"the sandbox's resolver cannot listen on {lease.host_address}:53 ({e}); "
                "free that port or set [network] dns = false"
            ) from e
        self._resolvers[host_if] = gate

    async def _link(self, lease: Lease, rules: EgressRules, resolver: str | None) -> None:
        host_if, name = lease.host_if, lease.netns

        def make() -> None:
            # In-process rtnetlink (tartarus-host's links): ~6 ms of `ip` processes less.
            _core.add_veth(host_if, SANDBOX_IF, NETNS_DIR / name, lease.host_address,
                           LINK_PREFIX_LEN)  # fmt: skip
            self._host_sysctls(host_if)

        await _netlink(make, f"cannot link sandbox {lease.sandbox_id} to the host")
        # Rules before the link is up: it never carries a packet they have not seen
        # (the eBPF filter attaches to the interface, so it must exist first).
        await self.enforcer.attach(
            LinkAddresses(
                sandbox_id=lease.sandbox_id,
                host_if=host_if,
                sandbox_address=lease.sandbox_address,
                resolver=resolver,
            ),
            rules,
        )
        if self.settings.bandwidth_mbit is not None:
            await limit_bandwidth(name, host_if, self.settings.bandwidth_mbit)
        await _netlink(functools.partial(_core.link_up, host_if), f"cannot set {host_if} up")
        await self.address(SandboxNetwork(sandbox_id=lease.sandbox_id, netns=name, lease=lease))

    @staticmethod
    def _host_sysctls(host_if: str) -> None:
        # No IPv6 on the host end (no link-local address to talk to); forwarding on,
        # which routed links need (it is a host-wide switch for IPv4).
        with contextlib.suppress(OSError):
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6", "1")
        # No source-routed packets from the sandbox (the eBPF filter drops IP options
        # too; nftables' chains do not look at them).
        with contextlib.suppress(OSError):
            _write_sysctl(f"/proc/sys/net/ipv4/conf/{host_if}/accept_source_route", "0")
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")

    async def address(self, net: SandboxNetwork) -> None:
        """(Re)gives the sandbox end its address and default route. gVisor's netstack
        takes the address off the interface when it starts, so this runs before each
        runsc start."""
        lease = net.lease
        if lease is None:
            return  # loopback only, brought up when the namespace was made
        configure = functools.partial(
            _core.configure_inside,
            net.path,
            SANDBOX_IF,
            lease.sandbox_address,
            LINK_PREFIX_LEN,
            lease.host_address,
        )
        await _netlink(configure, f"cannot address {SANDBOX_IF} in {net.netns}")

    async def remove(self, net: SandboxNetwork) -> None:
        """Removes the namespace, its link, rules and lease; what is gone already is
        skipped, so this runs on every exit path."""
        lease = net.lease
        if lease is not None:
            self.links.pop(lease.host_if, None)
            gate = self._resolvers.pop(lease.host_if, None)
            if gate is not None:
                gate.close()
            with contextlib.suppress(NetworkSetupError):
                delete = functools.partial(_core.delete_link, lease.host_if)
                await _netlink(delete, f"cannot delete {lease.host_if}")
            await self.enforcer.detach(lease.host_if)
        try:
            await anyio.to_thread.run_sync(_core.remove_netns, NETNS_DIR, net.netns)
        except OSError:
            log.warning("could not remove network namespace %s", net.netns, exc_info=True)
        if lease is not None:
            await anyio.to_thread.run_sync(self.pool.give_back, lease)

    async def reap(self, keep: set[str]) -> list[str]:
        """Removes this scope's namespaces, links and leases whose sandbox is not in
        `keep` (after a crash: nothing else removed them); of any scope, leases whose
        namespace is gone and rules or links without a lease. Returns the sandbox ids
        of this scope it reaped."""
        reaped: set[str] = set()
        prefix = self.netns_name("")
        for lease in list(self.pool.leases()):
            net = SandboxNetwork(sandbox_id=lease.sandbox_id, netns=lease.netns, lease=lease)
            if lease.scope == self.scope and lease.sandbox_id not in keep:
                await self.remove(net)
                reaped.add(lease.sandbox_id)
            elif not net.path.exists() and self.pool.aged(lease, ORPHAN_LEASE_S):
                # Any scope: a namespace is made before its lease and removed before
                # it is given back, so a lease that outlived its namespace is a leftover
                # (of a runtime whose state directory is gone, say).
                await self.remove(net)
        if NETNS_DIR.is_dir():
            for entry in sorted(NETNS_DIR.iterdir()):
                sandbox_id = entry.name.removeprefix(prefix)
                if entry.name.startswith(prefix) and sandbox_id not in keep:
                    await self.remove(SandboxNetwork(sandbox_id=sandbox_id, netns=entry.name))
                    reaped.add(sandbox_id)
        # A lease is written within microseconds of its file; one still empty after a
        # minute belongs to a process that died in between.
        await anyio.to_thread.run_sync(self.pool.drop_unwritten, UNWRITTEN_LEASE_S)
        # Leases are written before their link or rules exist, so a link or rule
        # without one is a leftover (its lease was given back, or never written). Links
        # and rules are looked at first, the leases after: a sandbox of another runtime
        # that takes its lease and makes its link meanwhile is not taken for one.
        ruled = await self.enforcer.attached()
        links = _host_links()
        leased = {lease.host_if for lease in self.pool.leases()}
        for host_if in ruled - leased:
            await self.enforcer.detach(host_if)
        for link in links - leased:
            with contextlib.suppress(NetworkSetupError):
                await _netlink(functools.partial(_core.delete_link, link), f"cannot delete {link}")
        return sorted(reaped)

    def close_resolvers(self) -> None:
        """Closes every sandbox resolver this runtime runs (what a process exit does)."""
        for gate in self._resolvers.values():
            gate.close()
        self._resolvers.clear()

    async def drops(self) -> dict[str, Drops]:
        """Dropped packets of this runtime's live links, by sandbox id."""
        drops = await self.enforcer.drops()
        return {
            sandbox_id: drops[host_if]
            for host_if, sandbox_id in list(self.links.items())
            if host_if in drops
        }
