"""Connecting to a socket in a directory a sandbox can write (the jail's agent socket,
which a restarted server connects to again): a symlink or a file put there by the
sandbox is refused, and never followed to another socket of the host."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tartarus.runtime.base import SandboxError
from tartarus.runtime.layout import own_socket


def listening(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    return server


def test_a_real_socket_is_reached_through_its_descriptor(tmp_path: Path) -> None:
    with listening(tmp_path / "agent.sock") as server, own_socket(tmp_path / "agent.sock") as where:
        assert where.startswith("/proc/self/fd/")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(where)
            accepted, _ = server.accept()
            accepted.close()


def test_a_symlink_to_a_host_socket_is_refused(tmp_path: Path) -> None:
    (tmp_path / "host").mkdir()
    with listening(tmp_path / "host" / "secret.sock") as server:
        server.setblocking(False)
        (tmp_path / "agent.sock").symlink_to(tmp_path / "host" / "secret.sock")
        with (
            pytest.raises(SandboxError, match="is not a socket"),
            own_socket(tmp_path / "agent.sock"),
        ):
            pass
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody was let through to it


@pytest.mark.parametrize("kind", ["file", "directory", "missing", "dangling link"])
def test_anything_else_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "agent.sock"
    if kind == "file":
        path.write_text("not a socket")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(SandboxError, match=str(path)), own_socket(path):
        pass
