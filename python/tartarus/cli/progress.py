"""Rich progress bars for Erebus' progress events: one bar per download (bytes, speed)
and a status line with the current step and its latest output."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from tartarus.cli.output import err_console
from tartarus.images.progress import Progress as Event
from tartarus.images.progress import ProgressCallback, ignore

MAX_MESSAGE = 90


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[ProgressCallback]:
    """Yields a progress callback that draws on stderr (or ignores events)."""
    if not enabled:
        yield ignore
        return
    bars = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )
    status = bars.add_task("starting", total=None)
    items: dict[str, TaskID] = {}

    def on_event(event: Event) -> None:
        if event.item is not None and event.done is not None:
            task = items.get(event.item)
            if task is None:
                label = event.item.removeprefix("sha256:")[:19]
                task = items[event.item] = bars.add_task(f"{event.step} {label}", total=event.total)
            bars.update(task, completed=event.done, total=event.total)
            return
        message = event.message.strip()
        if event.item:
            message = f"{event.item} {message}".strip()
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        bars.update(status, description=f"[cyan]{event.step}[/cyan] {message}")

    with bars:
        try:
            yield on_event
        except BaseException:
            # A failed build: its error says it all, half-drawn bars would only blur it.
            for task in bars.task_ids:
                bars.update(task, visible=False)
            raise
        bars.update(status, description="[green]done[/green]", total=1, completed=1)
