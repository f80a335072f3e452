"""Tartarus: sandboxes for untrusted code that start in milliseconds.

The pit where untrusted code is held: KVM microVMs restored from snapshots, gVisor, a
namespace/seccomp jail and WebAssembly, behind one SDK, one CLI and one HTTP API.
"""

from tartarus._core import __version__

__all__ = ["__version__"]
