"""`tartarus run`, `exec`, `ps`, `inspect`, `kill`, `logs`: sandboxes through the server."""

from __future__ import annotations

import sys

import click
import msgspec

from tartarus.api.sandbox import OnTimeout
from tartarus.api.types import (
    DEFAULT_TIMEOUT_S,
    CreateSandboxRequest,
    ExitInfo,
    LogEvent,
    PortInfo,
    ResourcesBody,
    SandboxInfo,
    StreamExecBody,
)
from tartarus.cli.interactive import interactive_exec
from tartarus.cli.output import emit_json, err_console, print_table, relative_time
from tartarus.cli.remote import (
    EXIT_TARTARUS_FAILED,
    connect,
    parse_pairs,
    run_async,
    signal_exit_code,
    url_option,
)
from tartarus.errors import TartarusError
from tartarus.runtime.types import Backend, SandboxState, TrustLevel
from tartarus.sdk.client import Client
from tartarus.sdk.commands import consume
from tartarus.sdk.sandbox import Sandbox, iterate_sandboxes, port_info

json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _command(argv: tuple[str, ...]) -> str | list[str]:
    """One argument is a shell line (`tartarus run -- 'ls | wc -l'`), several an argv."""
    if not argv:
        raise click.UsageError("give the command to run after --")
    return argv[0] if len(argv) == 1 else list(argv)


async def _stream_to_terminal(
    client: Client, sandbox_id: str, body: StreamExecBody
) -> tuple[ExitInfo, str, str]:
    events = client.events("POST", f"/v1/sandboxes/{sandbox_id}/exec/stream", json=body)

    def to_stdout(data: str) -> None:
        sys.stdout.write(data)
        sys.stdout.flush()

    def to_stderr(data: str) -> None:
        sys.stderr.write(data)
        sys.stderr.flush()

    result = await consume(events, to_stdout, to_stderr)
    exit_info = ExitInfo(
        code=result.exit_code,
        signal=result.signal,
        timed_out=result.timed_out,
        oom_killed=result.oom_killed,
    )
    return exit_info, result.stdout, result.stderr


@click.command("run")
@click.option("-t", "--template", default="base", show_default=True, help="Template to start.")
@click.option(
    "-b",
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default="auto",
    show_default=True,
    help="Isolation backend.",
)
@click.option(
    "--timeout",
    type=float,
    help="Seconds before the sandbox is stopped [default: the tenant's policy's for the "
    f"template, else the template's, else {DEFAULT_TIMEOUT_S:g}].",
)
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment.")
@click.option("-w", "--workdir", help="Working directory inside the sandbox.")
@click.option("--memory", "memory_mib", type=int, help="Memory limit in MiB.")
@click.option("--cpus", type=float, help="CPU limit (vCPUs).")
@click.option("--network", is_flag=True, help="Give the sandbox network access.")
@click.option("--trusted", is_flag=True, help="Trusted work: allows the light jail backend.")
@click.option("--keep", is_flag=True, help="Leave the sandbox running afterwards.")
@click.option(
    "--on-timeout",
    type=click.Choice([t.value for t in OnTimeout]),
    default=None,
    help="What the timeout does to a kept sandbox: end it, or pause it "
    "[default: the template's, else kill].",
)
@click.option(
    "--auto-pause-after",
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Pause a kept sandbox after this long without a call that needs it running.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Print only the sandbox's id, not the command's output "
    "(for scripts: SB=$(tartarus run --keep -q -- true)).",
)
@click.option("-i", "--interactive", is_flag=True, help="Attach stdin (a terminal if it is one).")
@click.option("--explain", is_flag=True, help="Say which backend was picked and why.")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Labels to attach.")
@json_option
@url_option
@click.argument("argv", nargs=-1, required=True)
def run_command(
    *,
    template: str,
    backend: str,
    timeout: float | None,
    env: tuple[str, ...],
    workdir: str | None,
    memory_mib: int | None,
    cpus: float | None,
    network: bool,
    trusted: bool,
    keep: bool,
    on_timeout: str | None,
    auto_pause_after: float | None,
    quiet: bool,
    interactive: bool,
    explain: bool,
    metadata: tuple[str, ...],
    as_json: bool,
    url: str | None,
    argv: tuple[str, ...],
) -> None:
    """Run a command in a new sandbox and exit with its exit code.

    \b
      tartarus run -- echo hello
      tartarus run -t python -- python3 -c 'print(6 * 7)'
      tartarus run -i -- sh            # an interactive shell
      SB=$(tartarus run --keep -q -- true)
    """
    if quiet and (interactive or as_json):
        raise click.UsageError("-q/--quiet goes with neither -i nor --json")
    cmd = _command(argv)
    request = CreateSandboxRequest(
        template=template,
        backend=Backend(backend),
        resources=ResourcesBody(vcpus=cpus, memory_mib=memory_mib),
        env=parse_pairs(env, "--env"),
        timeout_s=timeout,
        metadata=parse_pairs(metadata, "--metadata"),
        network=network,
        trust=TrustLevel.TRUSTED if trusted else TrustLevel.UNTRUSTED,
        on_timeout=None if on_timeout is None else OnTimeout(on_timeout),
        auto_pause_after_s=auto_pause_after,
    )
    code = _run(
        request,
        cmd,
        workdir=workdir,
        keep=keep,
        quiet=quiet,
        interactive=interactive,
        explain=explain,
        as_json=as_json,
        url=url,
    )
    sys.exit(code)


@run_async
async def _run(
    request: CreateSandboxRequest,
    cmd: str | list[str],
    *,
    workdir: str | None,
    keep: bool,
    quiet: bool,
    interactive: bool,
    explain: bool,
    as_json: bool,
    url: str | None,
) -> int:
    async with await connect(url) as client:
        info = await client.call("POST", "/v1/sandboxes", SandboxInfo, json=request)
        if explain:
            err_console.print(
                f"backend: [bold]{info.backend.value}[/bold] ({info.backend_reason})",
                highlight=False,
            )
        try:
            if interactive:
                exit_info = await interactive_exec(
                    client, info.id, cmd, tty_mode=sys.stdin.isatty(), env={}, cwd=workdir
                )
                stdout = stderr = ""
            elif as_json or quiet:
                body = StreamExecBody(cmd=cmd, cwd=workdir)
                result = await consume(
                    client.events("POST", f"/v1/sandboxes/{info.id}/exec/stream", json=body),
                    None,
                    None,
                )
                exit_info = ExitInfo(
                    code=result.exit_code, signal=result.signal, timed_out=result.timed_out
                )
                stdout, stderr = result.stdout, result.stderr
            else:
                exit_info, stdout, stderr = await _stream_to_terminal(
                    client, info.id, StreamExecBody(cmd=cmd, cwd=workdir)
                )
        except TartarusError as e:
            err_console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            exit_info, stdout, stderr = ExitInfo(code=EXIT_TARTARUS_FAILED), "", ""
        finally:
            if not keep:
                await client.call("DELETE", f"/v1/sandboxes/{info.id}")
        if as_json:
            emit_json(
                {
                    "sandbox": info,
                    "exit": exit_info,
                    "stdout": stdout,
                    "stderr": stderr,
                    "kept": keep,
                }
            )
        elif quiet:
            click.echo(info.id)
        elif keep:
            err_console.print(f"sandbox {info.id} keeps running", highlight=False)
        return signal_exit_code(exit_info.code, exit_info.signal, exit_info.timed_out)


@click.command("exec")
@click.option("-i", "--interactive", is_flag=True, help="Attach stdin.")
@click.option(
    "-t/-T",
    "--tty/--no-tty",
    default=None,
    help="Allocate a terminal [default: when stdin is a terminal].",
)
@click.option("-e", "--env", "env", multiple=True, metavar="KEY=VALUE", help="Environment.")
@click.option("-w", "--workdir", help="Working directory inside the sandbox.")
@url_option
@click.argument("sandbox_id")
@click.argument("argv", nargs=-1, required=True)
def exec_command(
    *,
    interactive: bool,
    tty: bool | None,
    env: tuple[str, ...],
    workdir: str | None,
    url: str | None,
    sandbox_id: str,
    argv: tuple[str, ...],
) -> None:
    """Run a command in a running sandbox and exit with its exit code.

    When stdin is a terminal the command gets one (interactive, with resizes).
    """
    use_tty = sys.stdin.isatty() if tty is None else tty
    code = _exec(
        sandbox_id,
        _command(argv),
        interactive=interactive or use_tty,
        use_tty=use_tty,
        env=parse_pairs(env, "--env"),
        workdir=workdir,
        url=url,
    )
    sys.exit(code)


@run_async
async def _exec(
    sandbox_id: str,
    cmd: str | list[str],
    *,
    interactive: bool,
    use_tty: bool,
    env: dict[str, str],
    workdir: str | None,
    url: str | None,
) -> int:
    async with await connect(url) as client:
        if interactive:
            exit_info = await interactive_exec(
                client, sandbox_id, cmd, tty_mode=use_tty, env=env, cwd=workdir
            )
        else:
            exit_info, _, _ = await _stream_to_terminal(
                client, sandbox_id, StreamExecBody(cmd=cmd, env=env, cwd=workdir)
            )
        return signal_exit_code(exit_info.code, exit_info.signal, exit_info.timed_out)


@click.command("ps")
@click.option("-a", "--all", "show_all", is_flag=True, help="Include stopped and failed ones.")
@click.option("-m", "--metadata", multiple=True, metavar="KEY=VALUE", help="Filter by label.")
@click.option("-q", "--quiet", is_flag=True, help="Only print ids.")
@json_option
@url_option
def ps_command(
    *, show_all: bool, metadata: tuple[str, ...], quiet: bool, as_json: bool, url: str | None
) -> None:
    """List sandboxes (running ones unless --all)."""
    states = [] if show_all else [SandboxState.RUNNING, SandboxState.PAUSED]
    items = _list(states, parse_pairs(metadata, "--metadata"), url)
    if as_json:
        emit_json(items)
        return
    if quiet:
        for info in items:
            click.echo(info.id)
        return
    print_table(
        ("ID", "TEMPLATE", "BACKEND", "STATE", "CREATED", "EXPIRES"),
        (
            (
                info.id,
                info.template,
                info.backend.value,
                info.state.value,
                relative_time(info.created_at),
                relative_time(info.expires_at),
            )
            for info in items
        ),
    )


@run_async
async def _list(
    states: list[SandboxState], metadata: dict[str, str], url: str | None
) -> list[SandboxInfo]:
    async with await connect(url) as client:
        return [info async for info in iterate_sandboxes(client, states, metadata)]


@click.command("inspect")
@url_option
@click.argument("sandbox_id")
def inspect_command(*, url: str | None, sandbox_id: str) -> None:
    """Print everything the server knows about a sandbox, as JSON."""
    emit_json(_inspect(sandbox_id, url))


@run_async
async def _inspect(sandbox_id: str, url: str | None) -> SandboxInfo:
    async with await connect(url) as client:
        return await client.call("GET", f"/v1/sandboxes/{sandbox_id}", SandboxInfo)


@click.command("kill")
@click.option(
    "--grace",
    type=float,
    default=None,
    help="Seconds of SIGTERM before the kill [default: the sandbox's stop grace, else 0].",
)
@json_option
@url_option
@click.argument("sandbox_ids", nargs=-1, required=True)
def kill_command(
    *, grace: float | None, as_json: bool, url: str | None, sandbox_ids: tuple[str, ...]
) -> None:
    """Stop sandboxes and free everything they held."""
    killed = _kill(list(sandbox_ids), grace, url)
    if as_json:
        emit_json({"killed": killed})
    else:
        for sandbox_id in killed:
            click.echo(sandbox_id)


@run_async
async def _kill(sandbox_ids: list[str], grace: float | None, url: str | None) -> list[str]:
    async with await connect(url) as client:
        for sandbox_id in sandbox_ids:
            await client.call("DELETE", f"/v1/sandboxes/{sandbox_id}", params={"grace_s": grace})
    return sandbox_ids


def _pause_resume_command(verb: str, doc: str) -> click.Command:
    """`tartarus pause` and `tartarus resume`: one POST per sandbox, its new state."""

    @click.command(verb, help=doc)
    @json_option
    @url_option
    @click.argument("sandbox_ids", nargs=-1, required=True)
    def command(*, as_json: bool, url: str | None, sandbox_ids: tuple[str, ...]) -> None:
        infos = _pause_resume(verb, list(sandbox_ids), url)
        if as_json:
            emit_json(infos)
        else:
            for info in infos:
                click.echo(f"{info.id} {info.state.value}")

    return command


@run_async
async def _pause_resume(verb: str, sandbox_ids: list[str], url: str | None) -> list[SandboxInfo]:
    async with await connect(url) as client:
        return [
            await client.call("POST", f"/v1/sandboxes/{sandbox_id}/{verb}", SandboxInfo)
            for sandbox_id in sandbox_ids
        ]


pause_command = _pause_resume_command(
    "pause",
    "Pause sandboxes: on gvisor and microvm written to disk, their memory freed (they "
    "survive a server restart); on the jail frozen in place. Their timeout clock stops.",
)
resume_command = _pause_resume_command(
    "resume", "Run paused sandboxes again, as they were, with the timeout they had left."
)


@click.command("port")
@json_option
@url_option
@click.argument("sandbox_id")
@click.argument("port", type=click.IntRange(1, 65535))
def port_command(*, as_json: bool, url: str | None, sandbox_id: str, port: int) -> None:
    """Print the URL that reaches PORT inside a sandbox through the server (HTTP and
    WebSocket, with the same credentials as the API). The sandbox needs a network."""
    info = _port(sandbox_id, port, url)
    if as_json:
        emit_json(info)
    else:
        click.echo(info.url)


@run_async
async def _port(sandbox_id: str, port: int, url: str | None) -> PortInfo:
    async with await connect(url) as client:
        return await port_info(client, sandbox_id, port)


@click.command("logs")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until it stops.")
@click.option("--since", type=int, default=0, help="Start at this sequence number.")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@url_option
@click.argument("sandbox_id")
def logs_command(
    *, follow: bool, since: int, as_json: bool, url: str | None, sandbox_id: str
) -> None:
    """Print a sandbox's output (every process, in order)."""
    _logs(sandbox_id, follow, since, as_json, url)


def _print_log(entry: LogEvent, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(msgspec.json.encode(entry).decode() + "\n")
    else:
        (sys.stderr if entry.stream == "stderr" else sys.stdout).write(entry.data)
    sys.stdout.flush()


@run_async
async def _logs(sandbox_id: str, follow: bool, since: int, as_json: bool, url: str | None) -> None:
    async with await connect(url) as client:
        sb = await Sandbox.connect(sandbox_id, client=client)
        if follow:
            async for entry in sb.follow_logs(since=since):
                _print_log(entry, as_json)
            return
        while True:
            page = await sb.logs(since=since)
            for entry in page.items:
                _print_log(entry, as_json)
            if not page.items:
                return
            since = page.next_seq
