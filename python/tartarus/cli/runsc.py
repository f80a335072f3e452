"""`tartarus runsc install|which`: the pinned gVisor runsc the gvisor backend runs."""

from __future__ import annotations

import time
from pathlib import Path

import click
import msgspec

from tartarus.cli.output import console, emit_json, err_console
from tartarus.config import load_settings
from tartarus.host import runsc as runsc_mod
from tartarus.host.runsc import BuildEvent


@click.group()
def runsc() -> None:
    """Build and locate the runsc (gVisor) the gvisor backend runs."""


class _Lines:
    """Progress as plain lines on stderr: each phase's start, then every 100 steps or
    30 seconds, whichever comes first."""

    def __init__(self) -> None:
        self.phase = ""
        self.last = time.monotonic()

    def __call__(self, event: BuildEvent) -> None:
        now = time.monotonic()
        if event.phase != self.phase or event.done % 100 == 0 or now - self.last > 30:
            self.phase = event.phase
            self.last = now
            err_console.print(
                f"runsc: {event.phase} {event.done}: {event.detail[-70:]}",
                highlight=False,
                soft_wrap=True,
            )


@runsc.command("install")
@click.option(
    "--go",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help=(
        "The go binary (default: `go` on PATH, else /usr/local/go/bin/go). One older than"
        " gVisor needs (Debian 12's 1.19) fetches the pinned Go toolchain first."
    ),
)
@click.option("--force", is_flag=True, help="Rebuild even if the cache has this version.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def install(go: Path | None, force: bool, as_json: bool) -> None:
    """Build the pinned runsc from source (Go), or reuse the cached build.

    Static (CGO_ENABLED=0) and stamped with its version, into
    CACHE_DIR/runsc/<version>/runsc; the gvisor backend then prefers it to runsc on PATH.
    Takes minutes the first time; a cache hit is instant."""
    cache = load_settings().cache_dir
    target = runsc_mod.pinned_path(cache)
    if not as_json and (force or not target.is_file()):
        err_console.print(
            f"runsc: building {runsc_mod.RUNSC_PACKAGE}@{runsc_mod.RUNSC_VERSION} "
            f"into {target} (a few minutes)",
            highlight=False,
            soft_wrap=True,
        )
    result = runsc_mod.build_runsc(
        cache, go=go, force=force, progress=None if as_json else _Lines()
    )
    if as_json:
        emit_json(result)
        return
    how = "cached" if result.cached else f"built with {result.go} in {result.seconds:.0f} s"
    console.print(f"runsc {result.version} ({how}): {result.path}", highlight=False, soft_wrap=True)


class Which(msgspec.Struct, frozen=True, kw_only=True):
    runsc: runsc_mod.Runsc
    platform: runsc_mod.Platform
    pinned_version: str
    pinned_path: str


@runsc.command("which")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def which(as_json: bool) -> None:
    """Show the runsc the gvisor backend would run, its version and platform."""
    settings = load_settings()
    found = runsc_mod.resolve_runsc(settings.runsc, settings.cache_dir)
    report = Which(
        runsc=found,
        platform=runsc_mod.probe_platform(found.path),
        pinned_version=runsc_mod.RUNSC_VERSION,
        pinned_path=str(runsc_mod.pinned_path(settings.cache_dir)),
    )
    if as_json:
        emit_json(report)
        return
    console.print(
        f"{found.path} ({found.source.value}), version {found.version}, "
        f"platform {report.platform.name}: {report.platform.reason}",
        highlight=False,
        soft_wrap=True,
    )
    if found.degraded:
        console.print(
            f"[red]degraded[/red]: {'; '.join(found.degraded)}; "
            "`tartarus runsc install` builds the pinned one",
            highlight=False,
        )
