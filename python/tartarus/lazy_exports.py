"""PEP 562 re-exports: a package names what its submodules define without loading them.

A package `__init__` that imported every submodule to re-export its names made any
import of one submodule (the API's bodies, the SDK, the server's error mapping) load
them all; `lazy_exports` loads each submodule when one of its names is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that finds each name of `homes` (name →
    submodule) in its submodule."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    return __getattr__
