"""Where Tartarus keeps its files: cache, state and runtime directories.

Each follows the XDG base directory conventions and can be overridden by an
environment variable or by `tartarus.toml` (see `tartarus.config`).
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: Path) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else fallback


def default_cache_dir() -> Path:
    """Rebuildable artefacts (kernels, rootfs images, layers): `~/.cache/tartarus`."""
    return _xdg("XDG_CACHE_HOME", Path.home() / ".cache") / "tartarus"


def default_state_dir() -> Path:
    """Durable state (database, blobs, snapshots): `~/.local/share/tartarus`."""
    return _xdg("XDG_DATA_HOME", Path.home() / ".local" / "share") / "tartarus"


def default_runtime_dir() -> Path:
    """Sockets and per-boot state: `$XDG_RUNTIME_DIR/tartarus` or `/tmp/tartarus-<uid>`."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "tartarus"
    # Per-user and created 0700 by ensure_private_dir.
    return Path("/tmp") / f"tartarus-{os.getuid()}"


def ensure_private_dir(path: Path) -> Path:
    """Creates `path` (mode 0700) and refuses one owned by someone else."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path
