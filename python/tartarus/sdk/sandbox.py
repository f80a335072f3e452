"""The async `Sandbox`: one sandbox on a Tartarus server.

    async with Sandbox.create("python") as sb:
        r = await sb.commands.run("python3 -c 'print(1)'")

`Sandbox.create(...)` can be awaited (`sb = await Sandbox.create()`) or used directly
as an async context manager; leaving the block kills the sandbox. A sandbox outlives
its client otherwise: it runs until its timeout, `kill()`, or the server stops.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any

import anyio
import msgspec

from tartarus.api.placement import PlacementRules
from tartarus.api.sandbox import Backend, OnTimeout, SandboxState, TrustLevel
from tartarus.api.snapshots import ForkBody, ForkResult, SnapshotEntry, SnapshotSandboxBody
from tartarus.api.types import (
    CodeContextInfo,
    CodeContextList,
    CodeError,
    CodeErrorEvent,
    CodeExecution,
    CodeLanguage,
    CodeResultEvent,
    CodeStderrEvent,
    CodeStdoutEvent,
    CodeStreamEvent,
    CreateCodeContextBody,
    CreateSandboxRequest,
    LogEvent,
    LogPage,
    PortInfo,
    ResourcesBody,
    RichResult,
    RunCodeBody,
    SandboxInfo,
    SandboxPage,
    SandboxStatsInfo,
    SetTimeoutRequest,
)
from tartarus.sdk.client import Client, disconnect_errors
from tartarus.sdk.commands import Callback, Commands, CommandStreamError, call_back
from tartarus.sdk.errors import (
    ConflictError,
    NotFoundError,
    ServerUnreachableError,
    UnavailableError,
)
from tartarus.sdk.files import Files
from tartarus.sdk.pty import Pty

_log_events = msgspec.json.Decoder(LogEvent)
_code_events = msgspec.json.Decoder(CodeStreamEvent)
# How long a create keeps trying through dropped connections and a restarting server.
CREATE_RETRY_S = 30.0


async def _create_with_retries(
    client: Client, request: CreateSandboxRequest, key: str
) -> SandboxInfo:
    """POSTs the create until it is answered, for up to `CREATE_RETRY_S`: a dropped
    connection, a server that is not up (restarting) or one that says 503 with
    `Retry-After` is tried again with the same idempotency key, so the sandbox is made
    once whatever happened to the earlier attempts. Refusals (quota, policy, a bad
    request) are not retried. A fleet's "still queued" is not a failure: the sandbox
    is accepted and waits for a node, so each such answer starts the budget again (the
    fleet's placement deadline bounds the wait; past it the answer is a refusal)."""
    deadline = time.monotonic() + CREATE_RETRY_S
    attempt = 0
    retriable: tuple[type[BaseException], ...] = (
        ServerUnreachableError,
        UnavailableError,
        ConflictError,
        *disconnect_errors(),
    )
    while True:
        try:
            return await client.call(
                "POST", "/v1/sandboxes", SandboxInfo, json=request, headers={"Idempotency-Key": key}
            )
        except retriable as e:
            wait = min(0.2 * 2**attempt, 2.0)
            if isinstance(e, ConflictError):
                # The earlier attempt with this key is still being made: wait for it.
                if not e.type.endswith("/idempotency-key-in-flight"):
                    raise
                wait = e.retry_after or 1.0
            elif isinstance(e, UnavailableError):
                if e.retry_after is None:
                    raise  # no backend, say: trying again does not help
                wait = e.retry_after
                if e.type.endswith("/still-queued"):
                    deadline = time.monotonic() + wait + CREATE_RETRY_S
            if time.monotonic() + wait > deadline:
                raise
            attempt += 1
            await anyio.sleep(wait)


def _context_id(context: CodeContextInfo | str | None) -> str | None:
    return context.id if isinstance(context, CodeContextInfo) else context


async def port_info(client: Client, sandbox_id: str, port: int) -> PortInfo:
    """Where `port` inside the sandbox is reached, its URL on this client's server (the
    server's own is built from the request's origin, which behind a proxy may differ;
    over a unix socket it is `http://localhost`)."""
    info = await client.call("GET", f"/v1/sandboxes/{sandbox_id}/ports/{port}", PortInfo)
    return msgspec.structs.replace(info, url=client.endpoint.base_url + info.path)


class Sandbox:
    def __init__(self, client: Client, info: SandboxInfo, *, owns_client: bool = True) -> None:
        self._client = client
        self._owns_client = owns_client
        self.info = info
        self.id = info.id
        self.commands = Commands(client, info.id)
        self.files = Files(client, info.id)
        self.pty = Pty(client, info.id)

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id (`id`; the name E2B's SDK uses)."""
        return self.id

    def __repr__(self) -> str:
        return (
            f"Sandbox(id={self.id!r}, template={self.info.template!r}, "
            f"backend={self.info.backend.value!r})"
        )

    # --- class methods ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        template: str = "base",
        *,
        timeout: float | None = None,
        envs: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        backend: Backend | str = Backend.AUTO,
        vcpus: float | None = None,
        memory_mib: int | None = None,
        network: bool = False,
        trusted: bool = False,
        secrets: dict[str, str] | None = None,
        placement: PlacementRules | None = None,
        from_snapshot: str | None = None,
        checkpoint_on_stop: bool = False,
        on_timeout: OnTimeout | str | None = None,
        auto_pause_after: float | None = None,
        stop_grace: float | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> _Creating:
        """Creates and starts a sandbox from `template`; it stops after `timeout`
        seconds unless `set_timeout` moves the deadline. What is left unset (`timeout`,
        `vcpus`, `memory_mib`) is not sent: the server takes it from the tenant's policy,
        else the template, else its own default (docs/policy.md, "Defaults"). Retries of
        a failed request reuse one idempotency key, so a retry never makes a second
        sandbox. `secrets` maps environment variables to secret references (`local:NAME`,
        `vault:PATH#FIELD`, ...) that every command gets, resolved by the server at exec
        time. `placement` says where it may run when the server schedules a fleet of
        nodes (docs/fleet.md).

        `from_snapshot`: restore this snapshot (`sb.snapshot().id`) instead: the
        sandbox starts as the snapshotted one was, on its template, backend and
        resources. `checkpoint_on_stop`: snapshot the sandbox when it is stopped.
        `on_timeout="pause"`: its timeout pauses it instead of ending it;
        `auto_pause_after`: pause it after that many seconds without a call that needs
        it running (unset, each: what the template says; else kill, and never). Any
        such call resumes a paused sandbox (docs/lifecycle.md). `stop_grace`: seconds
        of SIGTERM a `kill()` without its own `grace` gives (unset: the template's,
        else 0)."""
        resources = ResourcesBody(vcpus=vcpus, memory_mib=memory_mib)
        request = CreateSandboxRequest(
            template=template,
            backend=Backend(backend),
            resources=resources,
            env=envs or {},
            timeout_s=timeout,
            metadata=metadata or {},
            network=network,
            trust=TrustLevel.TRUSTED if trusted else TrustLevel.UNTRUSTED,
            secrets=secrets or {},
            placement=placement,
            from_snapshot=from_snapshot,
            checkpoint_on_stop=checkpoint_on_stop,
            on_timeout=None if on_timeout is None else OnTimeout(on_timeout),
            auto_pause_after_s=auto_pause_after,
            stop_grace_s=stop_grace,
        )

        async def make() -> Sandbox:
            owned = client is None
            c = client or await Client.connect(url, api_key=api_key)
            key = uuid.uuid4().hex
            try:
                info = await _create_with_retries(c, request, key)
            except BaseException:
                if owned:
                    await c.close()
                raise
            return cls(c, info, owns_client=owned)

        return _Creating(make)

    @classmethod
    async def connect(
        cls,
        sandbox_id: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> Sandbox:
        """A handle on an existing sandbox (created by this or another client)."""
        c = client or await Client.connect(url, api_key=api_key)
        try:
            info = await c.call("GET", f"/v1/sandboxes/{sandbox_id}", SandboxInfo)
        except BaseException:
            if client is None:
                await c.close()
            raise
        return cls(c, info, owns_client=client is None)

    @classmethod
    async def list(
        cls,
        *,
        state: list[SandboxState] | None = None,
        metadata: dict[str, str] | None = None,
        template: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        client: Client | None = None,
    ) -> list[SandboxInfo]:
        """Sandboxes on the server (running ones by default), every page of them."""
        states = [SandboxState.RUNNING] if state is None else state
        c = client or await Client.connect(url, api_key=api_key)
        try:
            return [info async for info in iterate_sandboxes(c, states, metadata, template)]
        finally:
            if client is None:
                await c.close()

    # --- this sandbox ----------------------------------------------------------------------

    async def get_info(self) -> SandboxInfo:
        self.info = await self._client.call("GET", f"/v1/sandboxes/{self.id}", SandboxInfo)
        return self.info

    async def is_running(self) -> bool:
        try:
            return (await self.get_info()).state is SandboxState.RUNNING
        except NotFoundError:
            return False

    async def set_timeout(self, timeout: float) -> None:
        """The sandbox now stops `timeout` seconds from now."""
        self.info = await self._client.call(
            "POST",
            f"/v1/sandboxes/{self.id}/timeout",
            SandboxInfo,
            json=SetTimeoutRequest(timeout_s=timeout),
        )

    async def stats(self) -> SandboxStatsInfo:
        return await self._client.call("GET", f"/v1/sandboxes/{self.id}/stats", SandboxStatsInfo)

    async def pause(self) -> None:
        """Pauses the sandbox: on gvisor and microvm it is written to disk and frees its
        memory (it survives a server restart); on the jail it is frozen in place. Its
        timeout clock stops. `resume()` (or `Sandbox.connect(id)` then `resume()`)
        brings it back as it was."""
        self.info = await self._client.call("POST", f"/v1/sandboxes/{self.id}/pause", SandboxInfo)

    async def resume(self) -> None:
        """Runs a paused sandbox again, with the timeout it had left."""
        self.info = await self._client.call("POST", f"/v1/sandboxes/{self.id}/resume", SandboxInfo)

    async def get_host(self, port: int) -> str:
        """The URL that reaches `port` inside the sandbox through the server, over HTTP
        and WebSocket: send it the same credentials as the API (this client's API key).
        The sandbox needs a network (`network=True`); its server sees the URL's path
        prefix in `X-Forwarded-Prefix`."""
        return (await port_info(self._client, self.id, port)).url

    async def snapshot(
        self, *, label: str = "", metadata: dict[str, str] | None = None
    ) -> SnapshotEntry:
        """Saves the sandbox as it is now (memory, processes, files); it keeps running.
        Start copies with `Sandbox.create(from_snapshot=snapshot.id)`."""
        return await self._client.call(
            "POST",
            f"/v1/sandboxes/{self.id}/snapshots",
            SnapshotEntry,
            json=SnapshotSandboxBody(label=label, metadata=metadata or {}),
        )

    async def fork(
        self,
        count: int = 1,
        *,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> builtins.list[Sandbox]:
        """`count` new sandboxes, each an exact copy of this one as it is now, that then
        go their own way (each handle has its own connection)."""
        result = await self._client.call(
            "POST",
            f"/v1/sandboxes/{self.id}/fork",
            ForkResult,
            json=ForkBody(count=count, timeout_s=timeout, metadata=metadata or {}),
        )
        return [Sandbox(self._client.copy(), info) for info in result.sandboxes]

    async def kill(self, *, grace: float | None = None) -> None:
        """Stops the sandbox (after `grace` seconds of SIGTERM; None: its own stop grace,
        from its create or template, else 0) and closes this handle."""
        try:
            await self._client.call("DELETE", f"/v1/sandboxes/{self.id}", params={"grace_s": grace})
        finally:
            await self.close()

    async def close(self) -> None:
        """Releases the connection; the sandbox keeps running."""
        if self._owns_client:
            await self._client.close()

    async def run_code(
        self,
        code: str,
        *,
        language: CodeLanguage | None = None,
        context: CodeContextInfo | str | None = None,
        on_stdout: Callback[str] | None = None,
        on_stderr: Callback[str] | None = None,
        on_result: Callback[RichResult] | None = None,
        on_error: Callback[CodeError] | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> CodeExecution:
        """Runs a cell in one of the sandbox's interpreters, which keeps its variables
        between calls like a notebook kernel: `context` (one made with
        `create_code_context`, or its id), else `language`'s default one ("python",
        "javascript" with node, "bash" with bash or sh). Returns rich
        results (text, HTML, images), the output, and the error if the code raised; a
        cell past `timeout` is interrupted and the context keeps its state.

        The callbacks get each line the cell prints, each result and the error while
        the cell runs (plain functions or coroutines). `envs` are environment variables
        for this cell only."""
        body = RunCodeBody(
            code=code,
            language=language,
            context=_context_id(context),
            timeout_s=timeout,
            envs=envs or {},
        )
        if on_stdout is None and on_stderr is None and on_result is None and on_error is None:
            return await self._client.call(
                "POST", f"/v1/sandboxes/{self.id}/code", CodeExecution, json=body
            )
        stream = self._client.ndjson(
            "POST", f"/v1/sandboxes/{self.id}/code/stream", _code_events, json=body
        )
        async for event in stream:
            if isinstance(event, CodeStdoutEvent):
                await call_back(on_stdout, event.text)
            elif isinstance(event, CodeStderrEvent):
                await call_back(on_stderr, event.text)
            elif isinstance(event, CodeResultEvent):
                await call_back(on_result, event.result)
            elif isinstance(event, CodeErrorEvent):
                await call_back(on_error, event.error)
            else:
                return event.execution
        raise CommandStreamError("the server ended the cell's stream before the cell ended")

    async def create_code_context(
        self, *, cwd: str | None = None, language: CodeLanguage = "python"
    ) -> CodeContextInfo:
        """An interpreter of its own: its variables, imports and working directory are
        not shared with the sandbox's other contexts."""
        return await self._client.call(
            "POST",
            f"/v1/sandboxes/{self.id}/code/contexts",
            CodeContextInfo,
            json=CreateCodeContextBody(language=language, cwd=cwd),
        )

    async def list_code_contexts(self) -> builtins.list[CodeContextInfo]:
        page = await self._client.call(
            "GET", f"/v1/sandboxes/{self.id}/code/contexts", CodeContextList
        )
        return page.items

    async def restart_code_context(self, context: CodeContextInfo | str) -> CodeContextInfo:
        """A fresh interpreter for the context (its state is gone)."""
        path = f"/v1/sandboxes/{self.id}/code/contexts/{_context_id(context)}/restart"
        return await self._client.call("POST", path, CodeContextInfo)

    async def remove_code_context(self, context: CodeContextInfo | str) -> None:
        path = f"/v1/sandboxes/{self.id}/code/contexts/{_context_id(context)}"
        await self._client.call("DELETE", path)

    async def logs(self, *, since: int = 0, limit: int = 1000) -> LogPage:
        return await self._client.call(
            "GET", f"/v1/sandboxes/{self.id}/logs", LogPage, params={"since": since, "limit": limit}
        )

    async def follow_logs(self, *, since: int = 0) -> AsyncIterator[LogEvent]:
        """The sandbox's log from `since`, then new entries until the sandbox stops."""
        async for name, data in self._client.sse(
            f"/v1/sandboxes/{self.id}/logs", {"since": since, "follow": True}
        ):
            if name == "log":
                yield _log_events.decode(data)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.kill()
        except NotFoundError:
            await self.close()


async def iterate_sandboxes(
    client: Client,
    states: list[SandboxState],
    metadata: dict[str, str] | None = None,
    template: str | None = None,
) -> AsyncIterator[SandboxInfo]:
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {
            "state": [s.value for s in states],
            "metadata": [f"{k}={v}" for k, v in (metadata or {}).items()],
            "template": template,
            "cursor": cursor,
        }
        page = await client.call("GET", "/v1/sandboxes", SandboxPage, params=params)
        for info in page.items:
            yield info
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


class _Creating:
    """What `Sandbox.create` returns: await it, or `async with` it."""

    def __init__(self, make: Callable[[], Awaitable[Sandbox]]) -> None:
        self._make = make
        self._sandbox: Sandbox | None = None

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._make().__await__()

    async def __aenter__(self) -> Sandbox:
        self._sandbox = await self._make()
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.__aexit__(exc_type, exc, tb)
