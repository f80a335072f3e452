"""nftables in-process (libnftables) against the `nft` command: the same scripts, the
same listing, the same refusals, and the command when the library is missing."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tartarus.network import libnftables
from tartarus.network.nftables import NftError, nft

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def table() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("nftables needs root (CAP_NET_ADMIN)")
    if libnftables.load() is None:
        pytest.skip(f"{libnftables.LIBRARY} does not load here (apt-get install libnftables1)")
    name = f"tt_libtest_{secrets.token_hex(3)}"
    yield name
    subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True, check=False)


def listing(table: str) -> object:
    out = subprocess.run(
        ["nft", "-j", "list", "table", "inet", table], capture_output=True, check=True
    ).stdout
    return [i for i in json.loads(out)["nftables"] if "metainfo" not in i]


async def test_a_script_lands_as_the_command_would_list_it(table: str) -> None:
    await nft(
        f"add table inet {table}\n"
        f"add chain inet {table} c {{ type filter hook forward priority 0; }}\n"
        f"add counter inet {table} n\n"
        f"add rule inet {table} c ip daddr 192.0.2.0/24 counter name n drop\n"
    )
    ours = json.loads(await nft(None, "-j", "list", "table", "inet", table))
    assert [i for i in ours["nftables"] if "metainfo" not in i] == listing(table)
    text = (await nft(None, "list", "table", "inet", table)).decode()
    assert "ip daddr 192.0.2.0/24" in text and "drop" in text


async def test_a_refused_script_changes_nothing_and_says_why(table: str) -> None:
    await nft(f"add table inet {table}\n")
    with pytest.raises(NftError, match=r"nft -f - failed: .*(No such file|does not exist)"):
        # One transaction: the first line would work, the second cannot.
        await nft(f"add chain inet {table} fine\nadd rule inet {table} nosuchchain counter\n")
    assert not any("chain" in i for i in listing(table))  # type: ignore[attr-defined]
    with pytest.raises(NftError, match="syntax error"):
        await nft("this is not nftables\n")


async def test_without_the_library_the_command_runs(
    table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libnftables, "load", lambda: None)
    await nft(f"add table inet {table}\n")
    assert listing(table) == [
        {"table": {"family": "inet", "name": table, "handle": listing(table)[0]["table"]["handle"]}}  # type: ignore[index]
    ]
    with pytest.raises(NftError, match="syntax error"):
        await nft("this is not nftables\n")
