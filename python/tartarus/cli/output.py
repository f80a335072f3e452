"""Shared CLI output helpers: `--json` for scripts, rich tables for people."""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgspec

from tartarus.codec import to_json

if TYPE_CHECKING:
    from types import TracebackType

    from rich.console import Console


class _LazyConsole:
    """A rich Console made on first use: rich costs tens of milliseconds to import, and
    `--json` output and quick commands never print through it.

    `__getattr__` forwards ordinary attributes only: Python looks special methods up on
    the type, so `with console:` (which rich's Live, Progress and Status do on every
    refresh) needs `__enter__` and `__exit__` spelled out here."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def real(self) -> Console:
        """The rich Console itself, made now if it was not yet."""
        if self._console is None:
            from rich.console import Console  # noqa: PLC0415

            self._console = Console(stderr=self._stderr)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __enter__(self) -> Console:
        return self.real().__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.real().__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<lazy {self.real()!r}>"


console = cast("Console", _LazyConsole(stderr=False))
err_console = cast("Console", _LazyConsole(stderr=True))


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


def print_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart, the header bold on a terminal (unless
    NO_COLOR): what a listing needs, without rich, whose import alone costs more than
    a quick command's own work. Long cells widen their column; nothing is cut."""
    table = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in table]  # fmt: skip
    if sys.stdout.isatty() and "NO_COLOR" not in os.environ:
        lines[0] = f"\x1b[1m{lines[0]}\x1b[0m"
    sys.stdout.write("\n".join(lines) + "\n")
