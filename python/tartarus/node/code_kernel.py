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
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec

from tartarus.api.types import CodeError, CodeExecution, RichResult
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
    encode: Callable[[str], bytes]  # a cell → its request line (without the newline)
    env: dict[str, str] = field(default_factory=dict)


def _json_request(code: str) -> bytes:
    return msgspec.json.encode({"code": code})


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
        lambda code: b"c" + base64.b64encode(code.encode()),
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

    async def run(self, code: str, timeout_s: float | None) -> CodeExecution:
        async with self._lock:
            answer = _Answer()
            try:
                if self._execution is None:
                    await self._start()
            except SandboxError as e:
                answer.error = CodeError(
                    name="KernelUnavailable", value=self._gone_message(e), traceback=""
                )
                return answer.result()
            assert self._execution is not None
            await self._execution.write_stdin(self._language.encode(code) + b"\n")
            watchdog = _Watchdog()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch, timeout_s or DEFAULT_CELL_TIMEOUT_S, watchdog)
                    # Never cancelled: cancelling a read would end the event stream, and
                    # the interpreter with it. The watchdog interrupts the cell instead.
                    await self._read_until_done(answer)
                    tg.cancel_scope.cancel()
            except KernelGoneError as e:
                await self.close()
                answer.error = (
                    _timeout(
                        "the cell ran past its timeout and the interpreter was restarted "
                        "(its variables are gone)"
                    )
                    if watchdog.killed
                    else CodeError(name="KernelDied", value=str(e), traceback="")
                )
                return answer.result()
            if watchdog.interrupted:
                answer.error = _timeout(
                    "the cell ran past its timeout and was interrupted",
                    answer.error.traceback if answer.error else "",
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
    def __init__(self) -> None:
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

    def add_stderr(self, text: str) -> None:
        if self._room(len(text)):
            self.stderr.append(text)

    def apply(self, event: KernelEvent) -> bool:
        """Records one kernel event; True when the cell is done."""
        if event.type == "stream":
            (self.add_stderr if event.name == "stderr" else self.add_stdout)(event.text)
        elif event.type == "result":
            fields = set(RichResult.__struct_fields__)
            data = {k: v for k, v in event.data.items() if k in fields}
            if self._room(sum(len(v) for v in data.values())):
                self.results.append(RichResult(**data, is_main_result=event.main))
        elif event.type == "error":
            self.error = CodeError(name=event.name, value=event.value, traceback=event.traceback)
        elif event.type == "done":
            self.count = event.count
            return True
        return False

    def result(self) -> CodeExecution:
        return CodeExecution(
            results=self.results,
            stdout="".join(self.stdout).splitlines(keepends=True),
            stderr="".join(self.stderr).splitlines(keepends=True),
            error=self.error,
            execution_count=self.count,
        )
