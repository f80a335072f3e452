"""Drives a code context's interpreter for `sb.run_code`: `kernel_main.py` (python3),
`kernel_main.js` (node) or `kernel_main.sh` (bash, else sh).

The interpreter is a background process in the sandbox, started on the context's first
cell and kept for the sandbox's life so variables persist. Cells run one at a time. A
cell that outlives its timeout gets SIGINT (an error in the cell); if the interpreter
does not answer, it is killed and the next cell starts a fresh one.
"""

from __future__ import annotations

import base64
import contextlib
import re
import secrets
import shlex
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from tartarus.api.types import (
    CodeError,
    CodeErrorEvent,
    CodeExecution,
    CodeResultEvent,
    CodeStderrEvent,
    CodeStdoutEvent,
    CodeStreamEvent,
    RichResult,
)
from tartarus.errors import InvalidRequestError
from tartarus.runtime.base import Execution, Sandbox, SandboxError
from tartarus.runtime.types import ExecRequest, OutputChunk

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class Language:
    """How to start a language's interpreter and hand it a cell."""

    name: str
    # What must be on the template's PATH.
    interpreter: str
    argv: Callable[[str], list[str]]  # the nonce → the command
    # A cell and its own environment variables → its request line (without the newline).
    encode: Callable[[str, dict[str, str]], bytes]
    env: dict[str, str] = field(default_factory=dict)


def _json_request(code: str, env: dict[str, str]) -> bytes:
    return msgspec.json.encode({"code": code, "env": env})


_SHELL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _shell_request(code: str, env: dict[str, str]) -> bytes:
    """`c` and the cell in base64; a cell with variables of its own is wrapped so that
    they are exported for it and restored (or unset) after it, keeping its status."""
    if env:
        bad = sorted(name for name in env if not _SHELL_NAME.match(name))
        if bad:
            raise InvalidRequestError(
                f"not a shell variable name: {', '.join(bad)}", slug="invalid-env-name"
            )
        before, after = [], []
        for i, (name, value) in enumerate(sorted(env.items())):
            before.append(f'__tt_had{i}="${{{name}+1}}"; __tt_old{i}="${{{name}-}}"')
            before.append(f"export {name}={shlex.quote(value)}")
            after.append(
                f'if [ -n "$__tt_had{i}" ]; then {name}="$__tt_old{i}"; else unset {name}; fi'
            )
        code = "\n".join(
            [
                *before,
                f"eval {shlex.quote(code)}",
                "__tt_status=$?",
                *after,
                '(exit "$__tt_status")',
            ]
        )
    return b"c" + base64.b64encode(code.encode())


_PYTHON = (_HERE / "kernel_main.py").read_text()
_NODE = (_HERE / "kernel_main.js").read_text()
_SHELL = (_HERE / "kernel_main.sh").read_text()
# bash where the template has it, else its sh; the kernel's source rides in the env.
_SHELL_START = (
    'if command -v bash >/dev/null 2>&1; then exec bash -c "$TT_KERNEL" kernel "$1"; '
    'else exec sh -c "$TT_KERNEL" kernel "$1"; fi'
)

LANGUAGES: dict[str, Language] = {
    "python": Language(
        "python",
        "python3",
        lambda nonce: ["python3", "-u", "-c", _PYTHON, nonce],
        _json_request,
        {"MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"},
    ),
    "javascript": Language(
        "javascript", "node", lambda nonce: ["node", "-e", _NODE, nonce], _json_request
    ),
    "bash": Language(
        "bash",
        "sh",
        lambda nonce: ["sh", "-c", _SHELL_START, "kernel", nonce],
        # Never an empty line (an empty cell is still a cell).
        _shell_request,
        {"TT_KERNEL": _SHELL},
    ),
}
DEFAULT_CELL_TIMEOUT_S = 300.0
INTERRUPT_GRACE_S = 5.0
# A cell's answer is bounded: past this much output the rest is dropped.
MAX_CELL_OUTPUT = 32 << 20


class KernelEvent(msgspec.Struct, kw_only=True):
    type: str
    name: str = ""
    text: str = ""
    value: str = ""
    traceback: str = ""
    data: dict[str, str] = msgspec.field(default_factory=dict)
    main: bool = False
    count: int = 0


class KernelGoneError(Exception):
    pass


class _Watchdog:
    interrupted = False
    killed = False


def _timeout(message: str, traceback: str = "") -> CodeError:
    return CodeError(name="TimeoutError", value=message, traceback=traceback)


_events = msgspec.json.Decoder(KernelEvent)


class CodeKernel:
    def __init__(self, sandbox: Sandbox, cwd: str | None = None, language: str = "python") -> None:
        self._sandbox = sandbox
        self._cwd = cwd
        self._language = LANGUAGES[language]
        self._lock = anyio.Lock()
        self._execution: Execution | None = None
        self._stream: AsyncIterator[Any] | None = None
        self._mark = b""
        self._pending = b""
        self._stderr_tail = b""

    async def _start(self) -> None:
        nonce = secrets.token_hex(8)
        self._mark = b"\x1e" + nonce.encode() + b" "
        self._execution = await self._sandbox.exec(
            ExecRequest(
                argv=self._language.argv(nonce),
                env=self._language.env,
                cwd=self._cwd,
                stdin=True,
                background=True,
            )
        )
        self._stream = aiter(self._execution.events())
        self._pending = b""
        self._stderr_tail = b""

    async def close(self) -> None:
        if self._execution is not None:
            with contextlib.suppress(Exception):
                await self._execution.kill()
        self._execution = None
        self._stream = None

    async def run(
        self,
        code: str,
        timeout_s: float | None,
        *,
        env: dict[str, str] | None = None,
        on_event: Callable[[CodeStreamEvent], None] | None = None,
    ) -> CodeExecution:
        """Runs one cell; `on_event` gets its output, results and error as they come."""
        return await self.run_request(self.request(code, env), timeout_s, on_event=on_event)

    def request(self, code: str, env: dict[str, str] | None = None) -> bytes:
        """A cell's request line; InvalidRequestError for what the language cannot take."""
        return self._language.encode(code, env or {}) + b"\n"

    async def run_request(
        self,
        request: bytes,
        timeout_s: float | None,
        *,
        on_event: Callable[[CodeStreamEvent], None] | None = None,
    ) -> CodeExecution:
        async with self._lock:
            watchdog = _Watchdog()
            answer = _Answer(on_event, watchdog)
            try:
                if self._execution is None:
                    await self._start()
            except SandboxError as e:
                answer.fail(
                    CodeError(name="KernelUnavailable", value=self._gone_message(e), traceback="")
                )
                return answer.result()
            assert self._execution is not None
            await self._execution.write_stdin(request)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, timeout_s or DEFAULT_CELL_TIMEOUT_S, watchdog)
                    # Never cancelled: cancelling a read would end the event stream, and
                    # the interpreter with it. The watchdog interrupts the cell instead.
                    await self._read_until_done(answer)
                    tg.cancel_scope.cancel()
            except KernelGoneError as e:
                await self.close()
                answer.fail(
                    _timeout(
                        "the cell ran past its timeout and the interpreter was restarted "
                        "(its variables are gone)"
                    )
                    if watchdog.killed
                    else CodeError(name="KernelDied", value=str(e), traceback="")
                )
                return answer.result()
            if watchdog.interrupted:
                answer.fail(
                    _timeout(
                        "the cell ran past its timeout and was interrupted",
                        answer.error.traceback if answer.error else "",
                    )
                )
            return answer.result()

    async def _watch(self, timeout_s: float, watchdog: _Watchdog) -> None:
        """SIGINT (a KeyboardInterrupt in the cell) at the deadline; a kill if that does
        not end the cell."""
        await anyio.sleep(timeout_s)
        assert self._execution is not None
        watchdog.interrupted = True
        with contextlib.suppress(SandboxError):
            await self._sandbox.kill_process(self._execution.pid, signal.SIGINT)
        await anyio.sleep(INTERRUPT_GRACE_S)
        watchdog.killed = True
        with contextlib.suppress(SandboxError):
            await self._execution.kill()

    async def _read_until_done(self, answer: _Answer) -> None:
        assert self._stream is not None
        while True:
            try:
                event = await anext(self._stream)
            except StopAsyncIteration:
                raise KernelGoneError(self._gone_message(None)) from None
            if not isinstance(event, OutputChunk):
                raise KernelGoneError(self._gone_message(event.code))
            if event.stream == "stderr":
                answer.add_stderr(event.data.decode(errors="replace"))
                self._stderr_tail = (self._stderr_tail + event.data)[-2000:]
                continue
            self._pending += event.data
            while b"\n" in self._pending:
                line, self._pending = self._pending.split(b"\n", 1)
                # An event may follow output that did not end its line (`printf hi`).
                at = line.find(self._mark)
                if at < 0:
                    answer.add_stdout(line.decode(errors="replace") + "\n")
                    continue
                if at:
                    answer.add_stdout(line[:at].decode(errors="replace"))
                if answer.apply(_events.decode(line[at + len(self._mark) :])):
                    return

    def _gone_message(self, cause: int | SandboxError | None) -> str:
        tail = self._stderr_tail.decode(errors="replace").strip()
        code = cause if isinstance(cause, int) else None
        if isinstance(cause, SandboxError):
            tail = str(cause)
        if code == 127 or "not found" in tail or "No such file" in tail:
            need = self._language.interpreter
            return (
                f"{need} is not in this sandbox's template; use a template with it "
                f"to run {self._language.name}"
            )
        return f"the interpreter exited (code {code})" + (f": {tail}" if tail else "")


class _Answer:
    def __init__(
        self,
        on_event: Callable[[CodeStreamEvent], None] | None = None,
        watchdog: _Watchdog | None = None,
    ) -> None:
        self._on_event = on_event or (lambda _event: None)
        # Lines are cut for a listener only: a cell run without one keeps its output as
        # it came.
        self._listening = on_event is not None
        self._watchdog = watchdog or _Watchdog()
        # A line's parts until its newline comes (joined once, not on every part).
        self._partial: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.results: list[RichResult] = []
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.error: CodeError | None = None
        self.count = 0
        self._size = 0

    def _room(self, size: int) -> bool:
        self._size += size
        return self._size <= MAX_CELL_OUTPUT

    def add_stdout(self, text: str) -> None:
        if self._room(len(text)):
            self.stdout.append(text)
            self._stream_lines("stdout", text)

    def add_stderr(self, text: str) -> None:
        if self._room(len(text)):
            self.stderr.append(text)
            self._stream_lines("stderr", text)

    def _stream_lines(self, name: str, text: str) -> None:
        """Streams whole lines (as E2B's callbacks get them); a partial line waits for
        its end, or for the next result, error or the cell's end."""
        if not self._listening:
            return
        parts = self._partial[name]
        if "\n" not in text:
            if text:
                parts.append(text)
            return
        *lines, rest = ("".join(parts) + text).split("\n")
        self._partial[name] = [rest] if rest else []
        for line in lines:
            self._emit_output(name, line + "\n")

    def _emit_output(self, name: str, text: str) -> None:
        event = CodeStdoutEvent(text=text) if name == "stdout" else CodeStderrEvent(text=text)
        self._on_event(event)

    def fail(self, error: CodeError) -> None:
        """The cell's error, decided here rather than by the interpreter (a timeout)."""
        self.error = error
        self.flush()
        self._on_event(CodeErrorEvent(error=error))

    def flush(self) -> None:
        for name, parts in self._partial.items():
            if parts:
                self._partial[name] = []
                self._emit_output(name, "".join(parts))

    def apply(self, event: KernelEvent) -> bool:
        """Records one kernel event; True when the cell is done."""
        if event.type == "stream":
            (self.add_stderr if event.name == "stderr" else self.add_stdout)(event.text)
        elif event.type == "result":
            fields = set(RichResult.__struct_fields__)
            data = {k: v for k, v in event.data.items() if k in fields}
            if self._room(sum(len(v) for v in data.values())):
                result = RichResult(**data, is_main_result=event.main)
                self.results.append(result)
                self.flush()
                self._on_event(CodeResultEvent(result=result))
        elif event.type == "error":
            self.error = CodeError(name=event.name, value=event.value, traceback=event.traceback)
            # An interrupt's KeyboardInterrupt is reported as the timeout it was (`fail`).
            if not self._watchdog.interrupted:
                self.flush()
                self._on_event(CodeErrorEvent(error=self.error))
        elif event.type == "done":
            self.count = event.count
            return True
        return False

    def result(self) -> CodeExecution:
        self.flush()
        return CodeExecution(
            results=self.results,
            stdout="".join(self.stdout).splitlines(keepends=True),
            stderr="".join(self.stderr).splitlines(keepends=True),
            error=self.error,
            execution_count=self.count,
        )
