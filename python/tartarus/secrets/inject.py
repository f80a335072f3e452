"""Secrets reach the sandbox at exec time: a Sandbox that adds them to every command.

The values are resolved for each command (a rotated secret is picked up by the next
one), passed to the backend in the exec request's environment, and never written into
the sandbox's record, its spec or the template. A command's own `env` wins over a
secret of the same name.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import msgspec

from tartarus.node.store import SandboxRecord
from tartarus.runtime.base import DirWatch, Execution, Sandbox
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    FileInfo,
    LogEntry,
    ProcessInfo,
    SandboxStats,
    SandboxStatus,
    SnapshotInfo,
    StopOutcome,
)
from tartarus.secrets.providers import SecretResolver


class SecretEnvSandbox:
    """Delegates everything to `inner`, adding resolved secrets to each exec."""

    def __init__(
        self, inner: Sandbox, resolver: SecretResolver, tenant: str, refs: dict[str, str]
    ) -> None:
        self.inner = inner
        self._resolver = resolver
        self._tenant = tenant
        self._refs = dict(refs)

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def lost(self) -> bool:
        return self.inner.lost

    @property
    def backend(self) -> Backend:
        return self.inner.backend

    async def exec(self, request: ExecRequest) -> Execution:
        env = await self._resolver.environment(self._tenant, self._refs)
        env.update(request.env)
        return await self.inner.exec(msgspec.structs.replace(request, env=env))

    async def start(self) -> None:
        await self.inner.start()

    async def status(self) -> SandboxStatus:
        return await self.inner.status()

    async def processes(self) -> list[ProcessInfo]:
        return await self.inner.processes()

    async def attach(self, pid: int) -> Execution:
        return await self.inner.attach(pid)

    async def kill_process(self, pid: int, signal: int = 9) -> None:
        await self.inner.kill_process(pid, signal)

    def logs(self, *, follow: bool = False, since_seq: int = 0) -> AsyncIterator[LogEntry]:
        return self.inner.logs(follow=follow, since_seq=since_seq)

    async def read_file(self, path: str) -> bytes:
        return await self.inner.read_file(path)

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self.inner.write_file(path, data, mode=mode)

    def download(self, path: str) -> AsyncIterator[bytes]:
        return self.inner.download(path)

    async def upload(self, path: str, chunks: AsyncIterable[bytes], *, mode: int = 0o644) -> int:
        return await self.inner.upload(path, chunks, mode=mode)

    async def list_dir(self, path: str) -> list[FileInfo]:
        return await self.inner.list_dir(path)

    async def stat(self, path: str) -> FileInfo:
        return await self.inner.stat(path)

    async def make_dir(self, path: str, *, parents: bool = True) -> None:
        await self.inner.make_dir(path, parents=parents)

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        await self.inner.remove(path, recursive=recursive)

    async def rename(self, src: str, dst: str) -> None:
        await self.inner.rename(src, dst)

    async def watch_dir(self, path: str, *, recursive: bool = False) -> DirWatch:
        return await self.inner.watch_dir(path, recursive=recursive)

    async def stats(self) -> SandboxStats:
        return await self.inner.stats()

    async def snapshot(self, dest_dir: Path) -> SnapshotInfo:
        return await self.inner.snapshot(dest_dir)

    async def suspend(self, dest_dir: Path) -> SnapshotInfo:
        return await self.inner.suspend(dest_dir)

    async def freeze(self) -> None:
        await self.inner.freeze()

    async def thaw(self) -> None:
        await self.inner.thaw()

    async def port_address(self, port: int) -> tuple[str, int]:
        return await self.inner.port_address(port)

    async def stop(self, grace_s: float = 10.0) -> StopOutcome | None:
        return await self.inner.stop(grace_s)

    async def halt(self) -> None:
        await self.inner.halt()

    async def kill(self) -> None:
        await self.inner.kill()

    async def detach(self) -> bool:
        return await self.inner.detach()


class SecretInjector:
    """The judges' sandbox wrapper: sandboxes created with secrets get them at exec."""

    def __init__(self, resolver: SecretResolver) -> None:
        self.resolver = resolver

    def __call__(self, record: SandboxRecord, sandbox: Sandbox) -> Sandbox:
        if not record.secrets:
            return sandbox
        return SecretEnvSandbox(sandbox, self.resolver, record.tenant, record.secrets)
