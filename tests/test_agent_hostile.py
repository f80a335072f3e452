"""Hostile clients: garbage, truncated, oversized and wrong-version frames get a clear
error, and the agent keeps serving everyone else. Plus `--init` as PID 1."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import anyio
import pytest

from tartarus.binaries import find_binary
from tartarus.runtime import protocol as p
from tartarus.runtime.agent_client import AgentClient, open_unix_stream
from tartarus.runtime.types import ExecRequest, PtySize
from tests.conftest import REPO_ROOT
from tests.support.agent import HostAgentSandbox, running_agent

pytestmark = pytest.mark.timeout(60)
VECTORS = REPO_ROOT / "tests" / "vectors" / "protocol"


def _hello() -> bytes:
    return p.encode_frame(p.Envelope(id=0, body=p.Hello(version=p.PROTOCOL_VERSION, client="t")))


def _read_replies(sock: socket.socket) -> list[p.Envelope]:
    """Every frame the agent sends until it closes the connection (or 5 s pass)."""
    sock.settimeout(5)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    frames = []
    while data:
        length = p.body_length(bytes(data[:4]))
        frames.append(p.decode_body(bytes(data[4 : 4 + length])))
        del data[: 4 + length]
    return frames


def _errors(frames: list[p.Envelope]) -> list[p.Error]:
    return [f.body for f in frames if isinstance(f.body, p.Error)]


def _assert_agent_serves(sock_path: Path) -> None:
    async def check() -> None:
        async with await AgentClient.connect_unix(sock_path) as client:
            assert isinstance(await client.call(p.Ping()), p.Pong)

    anyio.run(check)


@pytest.fixture
def agent_socket(tmp_path: Path) -> object:
    with running_agent(tmp_path) as (proc, sock_path):
        _assert_agent_serves(sock_path)
        yield sock_path
        assert proc.poll() is None, "the agent must survive hostile clients"
        _assert_agent_serves(sock_path)


CASES = {
    # name: (bytes sent after connecting, whether a hello precedes them, expected code)
    "garbage_instead_of_hello": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "too_large"),
    "oversized_frame": (struct.pack(">I", p.MAX_FRAME_BYTES + 1) + b"\0" * 64, True, "too_large"),
    "truncated_frame": (p.encode_frame(p.Envelope(id=3, body=p.Ping()))[:-2], True, "malformed"),
    "garbage_body": ((VECTORS / "invalid_garbage.bin").read_bytes(), True, "malformed"),
    "wrong_version": ((VECTORS / "invalid_hello_wrong_version.bin").read_bytes(), False,
                      "version_mismatch"),
    "no_hello": (p.encode_frame(p.Envelope(id=1, body=p.Ping())), False, "handshake_required"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_frames_get_a_clear_error(agent_socket: Path, case: str) -> None:
    payload, greet, code = CASES[case]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(agent_socket))
        if greet:
            sock.sendall(_hello())
        sock.sendall(payload)
        if case == "truncated_frame":
            sock.shutdown(socket.SHUT_WR)  # the peer ends mid-frame
        errors = _errors(_read_replies(sock))
    assert [e.code for e in errors] == [code], errors
    assert errors[0].message  # says what went wrong


def test_recoverable_errors_keep_the_connection(agent_socket: Path) -> None:
    unknown = (VECTORS / "invalid_unknown_type.bin").read_bytes()
    bad_field = (VECTORS / "invalid_bad_field.bin").read_bytes()
    reply_type = p.encode_frame(p.Envelope(id=9, body=p.Pong()))
    ping = p.encode_frame(p.Envelope(id=7, body=p.Ping()))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(agent_socket))
        sock.sendall(_hello() + unknown + bad_field + reply_type + ping)
        sock.shutdown(socket.SHUT_WR)
        frames = _read_replies(sock)
    replies = [(f.id, p.type_name(f.body), getattr(f.body, "code", None)) for f in frames]
    assert replies[0] == (0, "hello_ok", None)
    assert sorted(replies[1:]) == [
        (5, "error", "malformed"),  # a known type with a bad field
        (5, "error", "unknown_message"),  # the error names the request it answers
        (7, "pong", None),  # the connection survived the bad frames
        (9, "error", "not_a_request"),
    ]


def test_many_hostile_connections_at_once(agent_socket: Path) -> None:
    socks = []
    for i in range(20):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(agent_socket))
        sock.sendall(os.urandom(64 + i))
        socks.append(sock)
    _assert_agent_serves(agent_socket)
    for sock in socks:
        sock.close()


def test_client_reports_a_version_mismatch_clearly(tmp_path: Path) -> None:
    """A Python client of another protocol version is told so by the agent."""

    async def check(sock_path: Path) -> None:
        stream = await open_unix_stream(sock_path, 10)
        client = AgentClient(stream)
        try:
            with pytest.raises(Exception, match="version mismatch"):
                await client.call(p.Hello(version=99, client="future"), request_id=0)
        finally:
            await client.aclose()

    with running_agent(tmp_path) as (_, sock_path):
        anyio.run(check, sock_path)


@pytest.mark.timeout(60)
def test_init_mode_reaps_orphaned_zombies(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"a new pid namespace needs root (euid is {os.geteuid()})")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not on PATH")

    async def check(sock_path: Path) -> None:
        sb = HostAgentSandbox(sock_path)
        await sb.start()
        try:
            execution = await sb.exec(ExecRequest(shell="echo $$"))
            result = await execution.wait()
            # Inside its own pid namespace the agent is PID 1, so its child is not.
            assert int(result.stdout) > 1
            init = await sb.exec(ExecRequest(shell="cat /proc/1/cmdline | tr '\\0' ' '"))
            assert b"tartarus-agent" in (await init.wait()).stdout
            # Each subshell exits at once, orphaning its `sleep`, which is re-parented
            # to PID 1 (the agent) and becomes a zombie unless the agent reaps it.
            spawner = await sb.exec(
                ExecRequest(shell="for i in 1 2 3 4 5; do (sleep 0.2 &); done; echo done")
            )
            assert (await spawner.wait()).stdout == b"done\n"
            script = (
                'for s in /proc/[0-9]*/stat; do read -r line < $s 2>/dev/null && echo "$line"; done'
            )
            zombies: list[str] = []
            with anyio.fail_after(20):
                while True:
                    await anyio.sleep(0.5)
                    listing = await (await sb.exec(ExecRequest(shell=script))).wait()
                    lines = listing.stdout.decode().splitlines()
                    sleeps = [ln for ln in lines if "(sleep)" in ln]
                    zombies = [ln for ln in lines if ln.split(") ", 1)[-1].startswith("Z")]
                    if not sleeps:
                        break
            assert zombies == []
        finally:
            await sb.stop(grace_s=2)

    prefix = [unshare, "--pid", "--fork", "--mount-proc"]
    with running_agent(tmp_path, extra=["--init"], prefix=prefix) as (proc, sock_path):
        anyio.run(check, sock_path)
        proc.wait(timeout=15)
        assert proc.returncode == 0


def test_vsock_listener_starts(tmp_path: Path) -> None:
    """The agent binds its vsock port and serves on. (Connecting needs a VM or the
    vsock_loopback transport, which this host lacks: `connect((1, port))` times out.)"""
    if not Path("/dev/vsock").exists():
        pytest.skip("no /dev/vsock on this host")
    port = 20000 + os.getpid() % 20000
    agent = find_binary("tartarus-agent")
    stderr = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen([agent, "serve", "--listen", f"vsock:{port}"], stderr=stderr)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        stderr.close()
    assert (tmp_path / "stderr").read_text() == ""


def test_bad_command_lines_are_usage_errors() -> None:
    agent = find_binary("tartarus-agent")
    for argv in (["serve"], ["serve", "--listen", "tcp:1"], ["bogus"], []):
        out = subprocess.run([agent, *argv], capture_output=True, text=True, check=False)
        assert out.returncode == 2, argv
        assert "usage: tartarus-agent" in out.stderr
    version = subprocess.run([agent, "--version"], capture_output=True, text=True, check=True)
    assert f"protocol {p.PROTOCOL_VERSION}" in version.stdout


BUSYBOX_APPLETS = ("sh", "cat", "ls", "echo", "stty", "id", "tty", "mount", "sleep", "test")


def _bare_rootfs(root: Path) -> None:
    """A rootfs with busybox, the agent and /etc/passwd, and no /proc, /dev or /tmp."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox (Debian busybox-static) is not installed")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nguest:x:4242:4243::/:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nguest:x:4243:\n")
    (root / ".tartarus" / "run").mkdir(parents=True)
    shutil.copy2(find_binary("tartarus-agent"), root / ".tartarus" / "tartarus-agent")


@pytest.mark.timeout(60)
def test_init_mode_prepares_a_bare_rootfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting and chroot need root (euid is {os.geteuid()})")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not on PATH")
    root = tmp_path / "root"
    _bare_rootfs(root)
    argv = [
        unshare, "--mount", "--pid", "--fork", "--propagation", "private", "chroot", str(root),
        "/.tartarus/tartarus-agent", "serve", "--listen", "unix:/.tartarus/run/agent.sock",
        "--init",
    ]  # fmt: skip

    async def check(sock_path: Path) -> None:
        sb = HostAgentSandbox(sock_path)
        await sb.start()
        try:

            async def sh(script: str, **kw: object) -> bytes:
                execution = await sb.exec(ExecRequest(shell=script, **kw))  # type: ignore[arg-type]
                result = await execution.wait()
                assert result.exit.ok, (script, result)
                return result.stdout

            assert b"tartarus-agent" in await sh("cat /proc/1/cmdline")
            assert await sh("test -c /dev/null && test -c /dev/urandom && echo ok") == b"ok\n"
            assert await sh("echo hi > /tmp/f && cat /tmp/f") == b"hi\n"
            mounts = (await sh("cat /proc/mounts")).decode()
            assert " /proc proc " in mounts and " /tmp tmpfs " in mounts
            assert " /dev/pts devpts " in mounts
            assert await sh("tty", pty=PtySize(rows=10, cols=40)) == b"/dev/pts/0\r\n"
            assert await sh("id -u; id -g", user="guest") == b"4242\n4243\n"
        finally:
            await sb.stop(grace_s=2)

    stderr = (tmp_path / "agent.stderr").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=stderr)
    try:
        anyio.run(check, root / ".tartarus" / "run" / "agent.sock")
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    # The mounts lived in the sandbox's own mount namespace and went with it.
    assert str(root) not in Path("/proc/self/mounts").read_text()
