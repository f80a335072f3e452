"""Shared CLI output helpers: `--json` for scripts, rich tables for people."""

from __future__ import annotations

import datetime as dt
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


def relative_time(when: dt.datetime | None) -> str:
    """ "in 5m" or "3.2h ago"; "-" for no time."""
    if when is None:
        return "-"
    seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
    span = abs(seconds)
    text = (
        f"{span:.0f}s"
        if span < 120
        else f"{span / 60:.0f}m"
        if span < 7200
        else f"{span / 3600:.1f}h"
    )
    return f"in {text}" if seconds > 0 else f"{text} ago"
