"""`tartarus run [--backend B] [--explain] -- CMD...`: runs one command in a fresh
sandbox and streams its output; the exit code is the command's (128 + signal if a
signal ended it, 124 on timeout).

For now the sandbox runs in this process through the runtime; once the server lands,
`run` talks to it instead.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import anyio
import click

from tartarus.cli.output import emit_json, err_console
from tartarus.config import Settings, load_settings
from tartarus.host.doctor import run_doctor
from tartarus.runtime.busybox_rootfs import busybox_rootfs
from tartarus.runtime.selector import WASM_SUFFIXES, select_runtime
from tartarus.runtime.types import (
    Backend,
    ExecRequest,
    ExitStatus,
    OutputChunk,
    Resources,
    SandboxSpec,
    TrustLevel,
)

EXIT_TIMEOUT = 124


def _exit_code(status: ExitStatus) -> int:
    if status.timed_out:
        return EXIT_TIMEOUT
    if status.code is not None:
        return status.code
    return 128 + (status.signal or 0)


async def _run(
    spec: SandboxSpec,
    request: ExecRequest,
    settings: Settings,
    *,
    explain: bool,
    as_json: bool,
    allow_jail_untrusted: bool,
) -> int:
    report = await anyio.to_thread.run_sync(run_doctor, settings)
    selection = select_runtime(spec, report, settings, allow_jail_untrusted=allow_jail_untrusted)
    if explain:
        for line in selection.explanation:
            err_console.print(f"[dim]{line}[/dim]")
    sandbox = await selection.runtime.create(spec)
    stdout = sys.stdout.buffer
    stderr = sys.stderr.buffer
    out = {"stdout": bytearray(), "stderr": bytearray()}
    try:
        await sandbox.start()
        execution = await sandbox.exec(request)
        status: ExitStatus | None = None
        async for event in execution.events():
            if isinstance(event, OutputChunk):
                if as_json:
                    out[event.stream] += event.data
                else:
                    sink = stdout if event.stream == "stdout" else stderr
                    sink.write(event.data)
                    sink.flush()
            else:
                status = event
    finally:
        with anyio.CancelScope(shield=True):
            await sandbox.kill()
    assert status is not None
    if as_json:
        emit_json(
            {
                "backend": selection.backend.value,
                "explanation": selection.explanation,
                "stdout": out["stdout"].decode(errors="replace"),
                "stderr": out["stderr"].decode(errors="replace"),
                "exit": status,
            }
        )
    return _exit_code(status)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default=Backend.AUTO.value,
    show_default=True,
    help="Isolation backend; auto picks the strongest this host can run.",
)
@click.option("--explain", is_flag=True, help="Print why the backend was chosen (on stderr).")
@click.option(
    "--rootfs",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Root filesystem directory (default: the built-in busybox template).",
)
@click.option(
    "--trust",
    type=click.Choice([t.value for t in TrustLevel]),
    default=TrustLevel.UNTRUSTED.value,
    show_default=True,
)
@click.option(
    "--allow-jail-untrusted",
    is_flag=True,
    help="Policy: let auto put untrusted work in the jail when nothing stronger runs.",
)
@click.option("--timeout", type=float, help="Kill the command after this many seconds.")
@click.option("--memory", "memory_mib", type=int, default=512, show_default=True, help="MiB.")
@click.option("--network", is_flag=True, help="Give the sandbox network access.")
@click.option("--env", "-e", multiple=True, help="KEY=VALUE for the command.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a stream.")
@click.argument("command", nargs=-1, required=True)
def run(
    *,
    backend: str,
    explain: bool,
    rootfs: Path | None,
    trust: str,
    allow_jail_untrusted: bool,
    timeout: float | None,
    memory_mib: int,
    network: bool,
    env: tuple[str, ...],
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a new sandbox and stream its output.

    A COMMAND that is a .wasm (or .wat) module runs on the wasm backend.
    """
    settings = load_settings()
    pairs = dict(e.split("=", 1) for e in env if "=" in e)
    argv = list(command)
    wasm_module = Path(argv[0]) if argv[0].endswith(WASM_SUFFIXES) else None
    if wasm_module is not None:
        argv[0] = wasm_module.name
    elif rootfs is None:
        rootfs = busybox_rootfs(settings.cache_dir)
    spec = SandboxSpec(
        id=f"run-{secrets.token_hex(4)}",
        rootfs=rootfs,
        backend=Backend(backend),
        wasm_module=wasm_module,
        trust=TrustLevel(trust),
        network=network,
        resources=Resources(memory_mib=memory_mib),
    )
    request = ExecRequest(argv=argv, env=pairs, timeout_s=timeout)
    code = anyio.run(
        lambda: _run(
            spec,
            request,
            settings,
            explain=explain,
            as_json=as_json,
            allow_jail_untrusted=allow_jail_untrusted,
        )
    )
    sys.exit(code)
