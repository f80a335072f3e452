"""Runs the server: listeners, the embedded node agent, signals, graceful shutdown.

Startup: take the runtime dir's lock (one server per user and runtime dir), reconcile
the state with what is really running, then listen on the unix socket (0600, in the
0700 runtime dir) and, when asked, on TCP. Shutdown on SIGTERM/SIGINT: stop accepting,
let in-flight requests finish (`drain_s`), then stop every sandbox with its grace period.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import msgspec
from aiohttp import web

from tartarus.auth.tls import ReloadingTls
from tartarus.config import Settings
from tartarus.endpoint import Endpoint, default_socket_path
from tartarus.errors import TartarusError
from tartarus.node.manager import SandboxManager
from tartarus.node.provider import HostRuntimes
from tartarus.node.store import Store
from tartarus.paths import ensure_private_dir
from tartarus.secrets.redaction import install_log_redaction
from tartarus.server.app import build_app
from tartarus.server.plugins import ServerPlugin
from tartarus.server.routes.service import ACCEPTING
from tartarus.server.security import Security
from tartarus.snapshots.wiring import SnapshotWiring

log = logging.getLogger(__name__)


class ServerBusyError(TartarusError):
    pass


class ServeOptions(msgspec.Struct, kw_only=True, frozen=True):
    socket: Path | None = None
    # host:port; port 0 picks a free one (the chosen address is announced).
    tcp: str | None = None
    api_key: str | None = None
    grace_s: float = 10.0
    drain_s: float = 10.0
    # On shutdown, leave the sandboxes that can outlive the server running for the next
    # one on this state directory (an upgrade) instead of stopping them.
    leave_sandboxes: bool = False


def state_db_path(settings: Settings) -> Path:
    return settings.state_dir / "server.db"


def _lock(runtime_dir: Path) -> int:
    fd = os.open(runtime_dir / "server.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerBusyError(
            f"another tartarus server already runs for {runtime_dir}; use it "
            "(it answers on its socket) or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _split_host_port(tcp: str) -> tuple[str, int]:
    host, sep, port = tcp.rpartition(":")
    if not sep or not port.isdigit():
        raise TartarusError(f"--tcp wants HOST:PORT, got {tcp!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def serve(
    settings: Settings,
    options: ServeOptions,
    *,
    provider: HostRuntimes | None = None,
    on_ready: Callable[[list[Endpoint]], None] | None = None,
    stop: anyio.Event | None = None,
    plugins: Sequence[ServerPlugin] = (),
    open_store: Callable[[Path], Store] = Store,
    timeout_grace_s: float | None = None,
    reattach: bool = True,
) -> None:
    runtime_dir = ensure_private_dir(settings.runtime_dir)
    ensure_private_dir(settings.state_dir)
    lock_fd = _lock(runtime_dir)
    store = open_store(state_db_path(settings))
    security = Security.open(settings, owner_uid=os.getuid(), static_key=options.api_key)
    try:
        _refuse_open_exposure(options, security)
        install_log_redaction()
        tls = ReloadingTls(settings.auth.tls) if settings.auth.tls is not None else None
        manager = SandboxManager(
            store,
            provider or HostRuntimes(settings),
            grace_s=options.grace_s,
            admission=security.judges,
            timeout_grace_s=timeout_grace_s,
            reattach=reattach,
            leave_on_shutdown=options.leave_sandboxes,
            paused_retention_s=settings.paused_retention_s,
        )
        snapshot_wiring = SnapshotWiring.for_server(settings, manager, state_db_path(settings))
        async with manager.running(), snapshot_wiring.running(), AsyncExitStack() as extensions:
            manager.spawn(security.prune_forever)
            app = build_app(
                manager,
                security,
                middlewares=[m for p in plugins for m in p.middlewares()],
                tables=[t for p in plugins for t in p.route_tables()],
                snapshot_wiring=snapshot_wiring,
            )
            for plugin in plugins:
                await extensions.enter_async_context(plugin.running(manager, app))
            runner = web.AppRunner(
                app, handle_signals=False, access_log=None, shutdown_timeout=options.drain_s
            )
            await runner.setup()
            # The handlers are in place before anyone is told the server is ready: a
            # SIGTERM sent right after the announcement is a clean stop, not a kill.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                endpoints = await _listen(runner, options, settings, tls)
                if on_ready is not None:
                    on_ready(endpoints)
                await _wait_for_stop(signals, stop)
            log.info("shutting down: draining requests, then stopping sandboxes")
            app[ACCEPTING][0] = False
            await extensions.aclose()
            await runner.cleanup()
            for endpoint in endpoints:
                if endpoint.path is not None:
                    await anyio.Path(endpoint.path).unlink(missing_ok=True)
    finally:
        await security.close()
        store.close()
        os.close(lock_fd)


def _refuse_open_exposure(options: ServeOptions, security: Security) -> None:
    """TCP beyond loopback only with some form of authentication configured."""
    if options.tcp is None or security.authenticator.credentials_required():
        return
    host, _ = _split_host_port(options.tcp)
    if not _is_loopback(host):
        raise TartarusError(
            f"refusing to listen on {host} without authentication: create an API key "
            "(`tartarus auth keys create`), set TARTARUS_API_KEY, configure an OIDC "
            "issuer or client certificates ([auth] in tartarus.toml), or listen on 127.0.0.1"
        )


async def _listen(
    runner: web.AppRunner, options: ServeOptions, settings: Settings, tls: ReloadingTls | None
) -> list[Endpoint]:
    endpoints: list[Endpoint] = []
    socket_path = options.socket or default_socket_path(settings)
    socket_path.unlink(missing_ok=True)  # stale: we hold the lock, so no server owns it
    old_umask = os.umask(0o177)
    try:
        unix = web.UnixSite(runner, str(socket_path))
        await unix.start()
    finally:
        os.umask(old_umask)
    socket_path.chmod(0o600)
    endpoints.append(Endpoint.unix(socket_path))
    if options.tcp is not None:
        host, port = _split_host_port(options.tcp)
        tcp = web.TCPSite(runner, host, port, ssl_context=None if tls is None else tls.context)
        await tcp.start()
        server = tcp._server  # the bound address is only known after start
        if server is not None:
            for sock in server.sockets:  # type: ignore[attr-defined]
                bound_host, bound_port = sock.getsockname()[:2]
                endpoints.append(Endpoint.tcp(bound_host, bound_port, tls=tls is not None))
    return endpoints


async def _wait_for_stop(signals: AsyncIterator[int], stop: anyio.Event | None) -> None:
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            async for _ in signals:
                tg.cancel_scope.cancel()
                return

        tg.start_soon(on_signal)
        if stop is not None:
            await stop.wait()
            tg.cancel_scope.cancel()
