"""Progress events of long Erebus operations (pulls, builds), for CLI bars and the API."""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """One step forward. `item` names what moves (a layer digest, a package); `done`
    and `total` count its bytes when known; `message` is a line for people."""

    step: str
    message: str = ""
    item: str | None = None
    done: int | None = None
    total: int | None = None


ProgressCallback = Callable[[Progress], None]


def ignore(_: Progress) -> None:
    """The default callback: progress goes nowhere."""
