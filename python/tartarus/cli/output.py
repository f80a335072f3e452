"""Shared CLI output helpers: `--json` for scripts, rich tables for people."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
from rich.console import Console

from tartarus.codec import to_json

console = Console()
err_console = Console(stderr=True)


def emit_json(value: Any) -> None:
    """Writes `value` (msgspec Structs included) as one JSON document on stdout."""
    sys.stdout.write(msgspec.json.format(to_json(value).decode()) + "\n")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")
