"""Tartarus: sandboxes for untrusted code that start in milliseconds.

The pit where untrusted code is held: KVM microVMs restored from snapshots, gVisor, a
namespace/seccomp jail and WebAssembly, behind one SDK, one CLI and one HTTP API.
"""

from __future__ import annotations

from tartarus._core import __version__

# Not `from typing import TYPE_CHECKING`: typing costs the CLI's start-up ~8 ms, and
# type checkers treat this name alike.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from tartarus.sdk.sandbox import Sandbox

__all__ = ["Sandbox", "__version__"]


def __getattr__(name: str) -> Any:
    # The SDK pulls in aiohttp: import it on first use, not for every CLI command.
    if name == "Sandbox":
        from tartarus.sdk.sandbox import Sandbox  # noqa: PLC0415

        return Sandbox
    raise AttributeError(f"module 'tartarus' has no attribute {name!r}")
