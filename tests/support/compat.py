"""The compatibility table: everyday commands every Linux backend must run the same way
from the `python` template. Each row is a shell script (run with `/bin/sh -c`) and what
its output must contain, so any backend's suite can run the same rows: the jail and
gVisor here (tests/test_compat.py), the microVM lane with its own sandboxes.

Rows need nothing from the host: the wheel `pip` installs is built inside the sandbox,
and nothing touches the network. A suite skips a row whose `missing_programs` the
template lacks (the same on every backend), and otherwise awaits `run_case`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import anyio
import msgspec

from tartarus.images import ResolvedTemplate
from tartarus.runtime.base import Runtime, Sandbox
from tartarus.runtime.types import ExecRequest, SandboxSpec
from tests.support.backends import started

# Why a row that needs git is skipped on the `python` template (sizes: `apt-cache show`,
# Installed-Size, Debian 12): git drags in perl, most of the weight, for one row.
GIT_NOT_IN_TEMPLATE: Final = (
    "git is not in the python template: git (44.9 MB) needs perl (libperl5.36 28.9 MB, "
    "perl-modules-5.36 17.8 MB), ~95 MB on a ~130 MB template"
)


class CompatCase(msgspec.Struct, frozen=True, kw_only=True):
    """One command. It passes when it exits 0 (or, with `exec_timeout_s`, is stopped
    by the exec timeout) and its stdout holds every string of `expect`."""

    name: str
    script: str
    expect: tuple[str, ...] = ()
    # Programs the template must have (looked up under its /usr/bin, /bin, ...).
    needs: tuple[str, ...] = ()
    # Who runs it: the exec's `user` (None: whoever the agent runs as, root here).
    user: str | None = None
    # The exec's own timeout: the command must still be running when it fires.
    exec_timeout_s: float | None = None
    # How long the command may take before the test gives up on it.
    limit_s: float = 60.0


_WHEEL: Final = r"""
set -e
mkdir -p /tmp/wheels
python3 - <<'EOF'
import base64, hashlib, zipfile

files = {
    "tiny/__init__.py": "ANSWER = 42\n",
    "tiny-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tiny\nVersion: 1.0\n",
    "tiny-1.0.dist-info/WHEEL": (
        "Wheel-Version: 1.0\nGenerator: compat\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    ),
}

def digest(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + raw.decode()

record = "".join(f"{n},{digest(d.encode())},{len(d.encode())}\n" for n, d in files.items())
with zipfile.ZipFile("/tmp/wheels/tiny-1.0-py3-none-any.whl", "w") as whl:
    for name, data in files.items():
        whl.writestr(name, data)
    whl.writestr("tiny-1.0.dist-info/RECORD", record + "tiny-1.0.dist-info/RECORD,,\n")
EOF
python3 -m venv /tmp/venv
PIP_DISABLE_PIP_VERSION_CHECK=1 /tmp/venv/bin/pip install --no-index -q \
    /tmp/wheels/tiny-1.0-py3-none-any.whl
/tmp/venv/bin/python -c 'import sys, tiny; print("tiny", tiny.ANSWER, sys.prefix)'
"""

_UNIX_SOCKET: Final = r"""
python3 - <<'EOF'
import os, socket

path = "/tmp/compat.sock"
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen()
pid = os.fork()
if pid == 0:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"echo:" + conn.recv(64))
    os._exit(0)
server.close()
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
    client.connect(path)
    client.sendall(b"ping")
    print(client.recv(64).decode())
_, status = os.waitpid(pid, 0)
print("server exit", os.waitstatus_to_exitcode(status))
EOF
"""

_LOCKS: Final = r"""
python3 - <<'EOF'
import fcntl, os

fd = os.open("/tmp/compat.lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)                       # POSIX record lock
other = os.open("/tmp/compat.flock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(other, fcntl.LOCK_EX)                    # BSD lock
pid = os.fork()
if pid == 0:
    results = []
    for path, take in (("/tmp/compat.lock", fcntl.lockf), ("/tmp/compat.flock", fcntl.flock)):
        mine = os.open(path, os.O_RDWR)
        try:
            take(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            results.append("taken")
        except BlockingIOError:
            results.append("blocked")
    print("child:", *results, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
fcntl.lockf(fd, fcntl.LOCK_UN)
fcntl.flock(other, fcntl.LOCK_UN)
pid = os.fork()
if pid == 0:
    mine = os.open("/tmp/compat.lock", os.O_RDWR)
    fcntl.lockf(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("after unlock: taken", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
EOF
"""

_INOTIFY: Final = r"""
python3 - <<'EOF'
import ctypes, os, select, struct

IN_CLOSE_WRITE, IN_CREATE, IN_DELETE = 0x8, 0x100, 0x200
names = {IN_CLOSE_WRITE: "close_write", IN_CREATE: "create", IN_DELETE: "delete"}
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(os.O_NONBLOCK)
if fd < 0:
    raise OSError(ctypes.get_errno(), "inotify_init1")
os.makedirs("/tmp/watched", exist_ok=True)
if libc.inotify_add_watch(fd, b"/tmp/watched", IN_CLOSE_WRITE | IN_CREATE | IN_DELETE) < 0:
    raise OSError(ctypes.get_errno(), "inotify_add_watch")
with open("/tmp/watched/hello", "w") as f:
    f.write("x")
os.unlink("/tmp/watched/hello")
seen = []
while len(seen) < 3 and select.select([fd], [], [], 5)[0]:
    buf = os.read(fd, 4096)
    offset = 0
    while offset < len(buf):
        _, mask, _, length = struct.unpack_from("iIII", buf, offset)
        name = buf[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
        seen += [f"{label}:{name}" for bit, label in names.items() if mask & bit]
        offset += 16 + length
print(" ".join(seen))
EOF
"""

# SQLite's WAL mode maps its -shm file MAP_SHARED: on the root overlay and on /tmp.
_SQLITE_MMAP: Final = r"""
python3 - <<'EOF'
import mmap, os, sqlite3

for where in ("/root", "/tmp"):
    db = sqlite3.connect(f"{where}/compat.db")
    mode = db.execute("pragma journal_mode=wal").fetchone()[0]
    db.execute("create table t(x)")
    db.execute("insert into t values (1)")
    db.commit()
    rows = sqlite3.connect(f"{where}/compat.db").execute("select count(*) from t").fetchone()[0]
    print(where, mode, rows)
with open("/root/shared", "wb") as f:
    f.write(bytes(4096))
with open("/root/shared", "r+b") as f:
    shared = mmap.mmap(f.fileno(), 4096)
    pid = os.fork()
    if pid == 0:
        shared[:5] = b"child"
        os._exit(0)
    os.waitpid(pid, 0)
    print("mmap", shared[:5].decode())
EOF
"""

# multiprocessing's locks are POSIX semaphores: files in /dev/shm.
_POOL: Final = (
    "python3 -c 'import multiprocessing as m; print(\"pool\", m.Pool(2).map(abs, [-1, -2]))'"
)

# The python child sleeps in 0.1 s slices, not one long sleep: CPython runs a Python
# signal handler only between bytecodes, and time.sleep re-checks for one only when its
# clock_nanosleep returns EINTR. A SIGTERM whose C-level handler runs after the last check
# but before clock_nanosleep starts is noted and then slept through. Measured with this
# child and a 3 s sleep, two at a time: natively 0 of 600 runs; under gVisor (systrap)
# 2 of 120 slept out their whole sleep, and runsc --strace showed each time "Signal 15:
# delivering to handler", rt_sigreturn, then clock_nanosleep running its full length.
# With one 60 s sleep the row hit its 60 s limit. With slices, 600 runs under gVisor took
# at most 0.18 s from the signal to the exit; a SIGTERM that never arrives still fails
# the row ("code 0" after 30 s).
_SIGNALS: Final = r"""
sh -c 'trap "echo trapped TERM; exit 7" TERM; echo ready; while :; do sleep 0.1; done' \
    > /tmp/trap.out &
pid=$!
for _ in $(seq 50); do grep -q ready /tmp/trap.out && break; sleep 0.1; done
kill -TERM "$pid"
wait "$pid"
echo "exit=$?"
cat /tmp/trap.out
python3 - <<'EOF'
import os, signal, subprocess, sys

child = subprocess.Popen([sys.executable, "-c", (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: (print('python trapped TERM'), sys.exit(3)))\n"
    "print('ready', flush=True)\n"
    "for _ in range(300):\n"
    "    time.sleep(0.1)\n"
)], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\n"
child.send_signal(signal.SIGTERM)
print(child.stdout.read().strip(), "code", child.wait())
EOF
"""

CASES: Final[tuple[CompatCase, ...]] = (
    CompatCase(name="ls", script="ls -la /", expect=("proc", "tmp", "usr")),
    CompatCase(name="stat", script="stat / && stat -f /", expect=("File: /", "Inode:")),
    CompatCase(
        name="find",
        script="find /etc -maxdepth 1",
        expect=("/etc/passwd", "/etc/os-release"),
    ),
    CompatCase(
        name="cp-a",
        script=(
            "set -e\n"
            "mkdir -p /tmp/src/d && echo data > /tmp/src/d/f && chmod 640 /tmp/src/d/f\n"
            "ln -s d/f /tmp/src/link && touch -h -d '2001-02-03 04:05:06' /tmp/src/d/f\n"
            "cp -a /tmp/src /tmp/dst\n"
            "kept=$(stat -c '%a %u %g %Y' /tmp/src/d/f /tmp/dst/d/f | uniq | wc -l)\n"
            "echo kept=$kept $(stat -c %a /tmp/dst/d/f)\n"
            "echo link=$(readlink /tmp/dst/link)\n"
            "cp -a /etc /tmp/etc && diff -r --no-dereference /etc /tmp/etc && echo etc-same\n"
        ),
        expect=("kept=1 640", "link=d/f", "etc-same"),
    ),
    # What a user needs of df: it reads every mount, and /tmp has room. Whether /tmp is a
    # mount of its own is the backend's choice (a tmpfs on jail and gvisor, the overlay
    # root on the scratch disk in a microVM, where guest RAM is small).
    CompatCase(
        name="df",
        script=(
            "df && df -h / /tmp && df -P /tmp | awk 'NR == 2 && $4 > 1024 {print \"tmp has room\"}'"
        ),
        expect=("Filesystem", "tmp has room"),
    ),
    CompatCase(
        name="ps",
        # ps runs once the background child has exec'd sleep: before that it is a forked
        # sh (seen under gVisor, where the fork-to-exec window is wider).
        script=(
            'sleep 30 & until [ "$(cat /proc/$!/comm)" = sleep ]; do sleep 0.05; done; '
            "ps -eo pid,ppid,stat,comm && ps aux | grep -c 'sleep 30'"
        ),
        expect=("PID", "sleep", "ps"),
        needs=("ps",),
    ),
    CompatCase(
        name="venv-pip",
        script=_WHEEL,
        expect=("tiny 42 /tmp/venv",),
        needs=("python3",),
        limit_s=180.0,
    ),
    CompatCase(
        name="git",
        script=(
            "set -e\n"
            "git init -q /tmp/repo && cd /tmp/repo\n"
            "echo hello > README && git add README\n"
            "git -c user.name=compat -c user.email=compat@example.invalid commit -q -m first\n"
            "git log --oneline | cat && git status --short | wc -l\n"
        ),
        expect=("first",),
        needs=("git",),
    ),
    CompatCase(
        name="unix-socket",
        script=_UNIX_SOCKET,
        expect=("echo:ping", "server exit 0"),
        needs=("python3",),
    ),
    CompatCase(
        name="fcntl-locks",
        script=_LOCKS,
        expect=("child: blocked blocked", "after unlock: taken"),
        needs=("python3",),
    ),
    CompatCase(
        name="inotify",
        script=_INOTIFY,
        expect=("create:hello", "close_write:hello", "delete:hello"),
        needs=("python3",),
    ),
    CompatCase(
        name="proc-self",
        script=(
            "readlink /proc/self/exe\n"
            "grep -E '^(Name|PPid):' /proc/self/status\n"
            "tr '\\0' ' ' < /proc/self/cmdline; echo\n"
            "ls /proc/self/fd | wc -l\n"
            "head -n 1 /proc/self/mountinfo | cut -d' ' -f5\n"
            'python3 -c \'import os; print("pid", os.readlink("/proc/self") == str(os.getpid()))\'\n'  # noqa: E501
        ),
        expect=("/usr/bin/readlink", "Name:\tgrep", "tr ", "pid True"),
    ),
    CompatCase(
        name="signals",
        script=_SIGNALS,
        expect=("exit=7", "trapped TERM", "python trapped TERM code 3"),
        needs=("python3",),
    ),
    CompatCase(
        name="timeout",
        script='timeout 1 sleep 30; echo "timeout exit=$?"',
        expect=("timeout exit=124",),
        limit_s=20.0,
    ),
    CompatCase(name="exec-timeout", script="sleep 30", exec_timeout_s=1.0, limit_s=20.0),
    CompatCase(
        name="dev",
        script=(
            "set -e\n"
            "echo gone > /dev/null && head -c 16 /dev/urandom | wc -c\n"
            "[ -c /dev/tty ] && [ -d /dev/shm ] && [ -e /dev/fd/0 ] && echo devices-ok\n"
            f"{_POOL}\n"
        ),
        expect=("16", "devices-ok", "pool [1, 2]"),
        needs=("python3",),
    ),
    CompatCase(
        name="sqlite-mmap",
        script=_SQLITE_MMAP,
        expect=("/root wal 1", "/tmp wal 1", "mmap child"),
        needs=("python3",),
    ),
    CompatCase(
        name="fifo-tar",
        script=(
            "set -e\n"
            "mkfifo /tmp/fifo && (echo through-fifo > /tmp/fifo &) && cat /tmp/fifo\n"
            "tar czf /tmp/etc.tgz -C / etc && mkdir /tmp/x && tar xzf /tmp/etc.tgz -C /tmp/x\n"
            "diff -r --no-dereference /etc /tmp/x/etc && echo tar-same\n"
        ),
        expect=("through-fifo", "tar-same"),
    ),
    CompatCase(
        name="identity",
        script=(
            'echo "home=$HOME" && cd && echo "cd=$(pwd)"\n'
            'echo "hostname=$(hostname) uname=$(uname -n) user=$(id -un)"\n'
        ),
        expect=("home=/root", "cd=/root", "hostname=tartarus uname=tartarus user=root"),
    ),
    CompatCase(
        name="localhost",
        script=(
            # Not `ahostsv4`: with no network, AI_ADDRCONFIG hides IPv4 everywhere.
            "getent hosts localhost\n"
            "python3 - <<'EOF'\n"
            "import socket\n"
            "print('resolved', socket.gethostbyname('localhost'))\n"
            "with socket.create_server(('localhost', 0)) as server:\n"
            "    port = server.getsockname()[1]\n"
            "    with socket.create_connection(('localhost', port), timeout=5) as client:\n"
            "        conn, _ = server.accept()\n"
            "        client.sendall(b'over loopback')\n"
            "        print(conn.recv(64).decode())\n"
            "EOF\n"
        ),
        expect=("localhost ip6-localhost", "resolved 127.0.0.1", "over loopback"),
        needs=("python3",),
    ),
    CompatCase(
        name="non-root",
        user="nobody",
        script=(
            f'set -e\necho "user=$(id -un) home=$HOME"\ntouch /tmp/mine && echo tmp-ok\n{_POOL}\n'
        ),
        expect=("user=nobody home=/nonexistent", "tmp-ok", "pool [1, 2]"),
        needs=("python3",),
    ),
)

_PROGRAM_DIRS: Final = ("usr/local/bin", "usr/bin", "bin", "usr/sbin", "sbin")


def missing_programs(rootfs: Path, case: CompatCase) -> list[str]:
    """The programs `case` needs that the template's rootfs does not have."""
    return [
        name
        for name in case.needs
        if not any(
            (rootfs / d / name).exists() or (rootfs / d / name).is_symlink() for d in _PROGRAM_DIRS
        )
    ]


async def run_case(sandbox: Sandbox, case: CompatCase) -> None:
    """Runs `case` in `sandbox` and asserts what the row promises, showing the command's
    exit, stdout and stderr when it does not hold."""
    with anyio.fail_after(case.limit_s):
        request = ExecRequest(shell=case.script, user=case.user, timeout_s=case.exec_timeout_s)
        result = await (await sandbox.exec(request)).wait()
    out = result.stdout.decode(errors="replace")
    err = result.stderr.decode(errors="replace")
    detail = f"{sandbox.backend.value} {case.name}: {result.exit}\nstdout:\n{out}\nstderr:\n{err}"
    if case.exec_timeout_s is not None:
        assert result.exit.timed_out, detail
    else:
        assert result.exit.ok, detail
    for expected in case.expect:
        assert expected in out, f"{expected!r} missing\n{detail}"


@contextlib.asynccontextmanager
async def started_from_template(
    runtime: Runtime, template: ResolvedTemplate, sandbox_id: str, *, rootfs: Path | None
) -> AsyncIterator[Sandbox]:
    """A sandbox of `template` on `runtime`, started, killed on the way out. `rootfs`: the
    template's directory (container backends), or None for its ext4 image (microvm)."""
    manifest = template.manifest
    spec = SandboxSpec(
        id=sandbox_id,
        template=manifest.id,
        rootfs=rootfs,
        resources=manifest.resources,
        env=manifest.env,
    )
    async with started(await runtime.create(spec)) as sb:
        yield sb
