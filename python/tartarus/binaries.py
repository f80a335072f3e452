"""Locates the Rust programs that ship inside the installed package.

`tartarus-agent` and `tartarus-vmm` are built into the wheel under `tartarus/_bin/`.
They are found relative to this module, never from a source checkout, with explicit
overrides for operators who install them elsewhere.
"""

from __future__ import annotations

import functools
import os
import shutil
import sysconfig
from pathlib import Path

from tartarus.errors import BinaryNotFoundError

PACKAGE_BIN_DIR = Path(__file__).resolve().parent / "_bin"


def _env_var(name: str) -> str:
    return "TARTARUS_" + name.upper().replace("-", "_").removeprefix("TARTARUS_") + "_BIN"


@functools.cache
def _scripts_dir() -> Path:
    # sysconfig expands its install scheme on every call (~1 ms here, once per sandbox
    # created); the interpreter's scripts directory does not move while it runs.
    return Path(sysconfig.get_path("scripts"))


def find_binary(name: str) -> Path:
    """Returns the path of an executable, searching in a fixed, reported order.

    1. `$TARTARUS_<NAME>_BIN` (e.g. `TARTARUS_AGENT_BIN` for `tartarus-agent`);
    2. the package's own `_bin/` directory;
    3. the interpreter's scripts directory (where pip puts executables);
    4. `$PATH`.
    """
    searched: list[str] = []
    override = os.environ.get(_env_var(name))
    if override:
        searched.append(f"${_env_var(name)}={override}")
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    else:
        searched.append(f"${_env_var(name)} (unset)")
    candidates = [PACKAGE_BIN_DIR / name, _scripts_dir() / name]
    for candidate in candidates:
        searched.append(str(candidate))
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    searched.append("$PATH")
    found = shutil.which(name)
    if found:
        return Path(found)
    raise BinaryNotFoundError(name, searched)
