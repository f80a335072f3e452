"""The sandboxes' resolver's message handling (`tartarus.network.dns`): questions,
REFUSED answers, A records behind compressed names, name patterns. No sockets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tartarus.network.dns import (
    DnsFormatError,
    a_records,
    host_upstream,
    matches,
    question,
    refused,
)


def query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def test_question_and_refused() -> None:
    q = query("PyPI.org")
    assert question(q)[:2] == ("pypi.org", 1)
    r = refused(q)
    ident, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", r)
    assert (ident, flags & 0x800F, flags & 0x0100, qd, an, ns, ar) == (
        0x1234,
        0x8005,
        0x0100,
        1,
        0,
        0,
        0,
    )
    assert r[12:] == q[12:]
    with pytest.raises(DnsFormatError):
        question(q[:14])


def test_a_records_follow_compression_and_skip_other_types() -> None:
    q = query("a.example")
    cname = b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 30, 2) + b"\xc0\x0c"
    a = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([203, 0, 113, 9])
    answer = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 2, 0, 0) + q[12:] + cname + a
    assert a_records(answer) == [("203.0.113.9", 300)]


def test_name_patterns() -> None:
    assert matches("pypi.org", "pypi.org")
    assert not matches("pypi.org", "x.pypi.org")
    assert matches("*.pythonhosted.org", "files.pythonhosted.org")
    assert not matches("*.pythonhosted.org", "pythonhosted.org")
    assert not matches("*.pythonhosted.org", "evilpythonhosted.org")


def test_host_upstream_reads_the_first_ipv4_nameserver(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver fe80::1\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert host_upstream(conf) == "192.0.2.53"
    assert host_upstream(tmp_path / "missing") is None
