"""Programs on a pseudo-terminal, as a person runs them: `on_terminal` runs one command
and returns what the terminal showed; `Shell` is an interactive bash that runs lines
one at a time and reports each line's exit status."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TRACEBACK = "Traceback (most recent call last)"
ROWS, COLUMNS = 40, 100
# bash expands `$?` in PS1 before each prompt: the status of the line that just ended.
_PROMPT = re.compile(r"@@status=(\d+)@@")
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(shown: bytes) -> str:
    """What a person reads: text without colour and cursor escapes, `\n` line ends."""
    return _ESCAPE.sub("", shown.decode(errors="replace")).replace("\r\n", "\n")


@dataclass
class Shown:
    """What a terminal showed (stdout and stderr together, as a person sees them)."""

    code: int
    text: str

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.text


def _read(fd: int, wait: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], wait)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # the other side closed the terminal
        return b""


def _spawn(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid != 0:  # a terminal of a common size (a new pty has none: programs guess)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    if pid == 0:  # the child: `argv` with the pty as its terminal
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.execvpe(argv[0], list(argv), dict(env))  # noqa: S606
        finally:
            os._exit(127)
    return pid, fd


def _reap(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def on_terminal(
    *args: str,
    env: Mapping[str, str],
    cwd: Path | None = None,
    typed: Sequence[bytes] = (),
    after: bytes = b"",
    timeout: float = 60.0,
) -> Shown:
    """Runs `tartarus ARGS` on a new terminal (its stdin, stdout and stderr), types each
    of `typed` once it shows something new (a prompt) or waits quietly for a second, and
    returns its exit code and everything shown. With `after`, typing waits until the
    terminal has shown that."""
    pid, fd = _spawn([sys.executable, "-m", "tartarus", *args], dict(env, TERM="xterm"), cwd)
    output = b""
    to_type = list(typed)
    last_typed = last_shown = time.monotonic()
    shown_then = 0
    deadline = last_typed + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
                last_shown = time.monotonic()
            now = time.monotonic()
            # A program asks, then reads (some flush what was typed before they read).
            asked = len(output) > shown_then and now - last_shown > 0.3
            waited = after in output
            if to_type and waited and (asked or now - max(last_typed, last_shown) > 1.0):
                os.write(fd, to_type.pop(0))
                last_typed, shown_then = time.monotonic(), len(output)
        else:
            os.kill(pid, signal.SIGKILL)
        code = _reap(pid, 10)
    finally:
        os.close(fd)
    return Shown(code, plain(output))


class ShellTimeoutError(Exception):
    pass


class Shell:
    """An interactive bash (no rc files, no line editing) on a pseudo-terminal.

    `run(line)` types the line and waits for the next prompt, whose text carries the
    line's exit status; the terminal's echo of the typed line is part of what it shows.
    """

    def __init__(self, env: Mapping[str, str], cwd: Path) -> None:
        env = dict(env, TERM="xterm", PS1="@@status=$?@@\n", PS2="", HISTFILE="/dev/null")
        self.pid, self.fd = _spawn(["bash", "--norc", "--noprofile", "--noediting", "-i"], env, cwd)
        self.transcript = ""
        self._wait_prompt(30.0)

    def _wait_prompt(self, timeout: float, since: int = 0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            match = _PROMPT.search(self.transcript, since)
            if match:
                return int(match.group(1))
            if time.monotonic() > deadline:
                shown = self.transcript[since:][-2000:]
                raise ShellTimeoutError(
                    f"no prompt within {timeout:g} s; the terminal shows:\n{shown}"
                )
            chunk = _read(self.fd, 0.2)
            self.transcript += plain(chunk)

    def _settle(self, since: int, quiet: float, timeout: float) -> None:
        """Waits until the terminal shows something after `since` and then nothing new
        for `quiet` seconds (a program waiting for its user)."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline:
            chunk = _read(self.fd, 0.1)
            if chunk:
                self.transcript += plain(chunk)
                last = time.monotonic()
            elif len(self.transcript) > since and time.monotonic() - last >= quiet:
                return

    def run(
        self, line: str, *, typed: str | None = None, interrupt: bool = False, timeout: float
    ) -> tuple[int, str]:
        """Runs `line`; `typed` is typed (then Enter) and `interrupt` presses Ctrl-C once
        the program waits. Returns the exit status and what the terminal showed."""
        start = len(self.transcript)
        os.write(self.fd, line.encode() + b"\n")
        if typed is not None or interrupt:
            # The echo of the line itself comes first; what follows is the program's.
            self._settle(start + len(line) + 1, 1.0, min(timeout, 30.0))
        if typed is not None:
            os.write(self.fd, typed.encode() + b"\r")
        if interrupt:
            os.write(self.fd, b"\x03")
        code = self._wait_prompt(timeout, start)
        return code, self.transcript[start:]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.fd, b"exit\n")
        _reap(self.pid, 5)
        os.close(self.fd)
