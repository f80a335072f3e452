"""The host's end of an agent that dials out (`tartarus-agent serve --listen dial:PATH`).

gVisor's agent reaches the host through a socket in a host directory bound into the
sandbox (`runsc --host-uds=open`): no `runsc exec` per connection, and the agent dials
again after a restore, so the link survives checkpoints. The host listens only while it
waits for the agent: between connections the socket file is gone and the sandbox can
reach no host socket at all, which is also what lets runsc checkpoint it (it cannot save
a sandbox that holds a host socket).

Whoever in the sandbox dials first is taken for the agent. That gives nothing away:
commands run as root in the sandbox by default, and could stop or replace the agent
anyway; what the host reads from the connection is untrusted either way.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc

from tartarus.runtime.agent_client import (
    DEFAULT_CONNECT_TIMEOUT_S,
    AgentClient,
    AgentConnectionError,
)
from tartarus.runtime.layout import reachable_socket


class AgentDialIn:
    """Accepts one agent connection at a time on `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener: anyio.abc.SocketListener | None = None

    async def listen(self) -> None:
        """Starts listening (before the sandbox starts, so the agent's first dial lands)."""
        if self._listener is None:
            with reachable_socket(self.path) as where:
                self._listener = await anyio.create_unix_listener(where, mode=0o600, backlog=1)

    async def accept(self, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> AgentClient:
        """Waits for the agent to dial, stops listening, and greets it."""
        await self.listen()
        assert self._listener is not None
        try:
            with anyio.fail_after(timeout_s):
                stream = await self._listener.accept()
        except TimeoutError:
            raise AgentConnectionError(
                f"the agent did not connect to {self.path} within {timeout_s:g} s"
            ) from None
        finally:
            await self.close()
        return await AgentClient.over_stream(stream, timeout_s=timeout_s)

    async def close(self) -> None:
        """Stops listening and removes the socket file."""
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.aclose()
        await anyio.Path(self.path).unlink(missing_ok=True)
