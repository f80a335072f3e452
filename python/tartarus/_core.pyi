"""Type stubs for the Rust extension `tartarus._core`."""

from os import PathLike
from typing import Any

__version__: str

def probe_host(disk_path: str | PathLike[str]) -> dict[str, Any]: ...
