"""`tartarus cp`: copy a file into or out of a sandbox (streamed, any size)."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import click

from tartarus.cli.output import emit_json
from tartarus.cli.remote import connect, run_async, url_option
from tartarus.sdk.files import Files


def _split(spec: str) -> tuple[str | None, str]:
    """`ID:/path` names a sandbox file; anything else is local (`./a:b` stays local)."""
    head, sep, tail = spec.partition(":")
    if sep and head.startswith("sb-") and tail.startswith("/"):
        return head, tail
    return None, spec


@click.command("cp")
@click.option("--json", "as_json", is_flag=True, help="Print what was copied as JSON.")
@url_option
@click.argument("src")
@click.argument("dst")
def cp_command(*, as_json: bool, url: str | None, src: str, dst: str) -> None:
    """Copy a file between this machine and a sandbox.

    \b
      tartarus cp ./data.csv sb-0123456789abcdef:/tmp/data.csv
      tartarus cp sb-0123456789abcdef:/tmp/out.png ./out.png
      tartarus cp sb-0123456789abcdef:/etc/os-release -     # to stdout
    """
    src_box, src_path = _split(src)
    dst_box, dst_path = _split(dst)
    if (src_box is None) == (dst_box is None):
        raise click.UsageError("exactly one of SRC and DST must be SANDBOX_ID:/absolute/path")
    size = _copy(src_box, src_path, dst_box, dst_path, url)
    if as_json:
        emit_json({"src": src, "dst": dst, "bytes": size})


@run_async
async def _copy(
    src_box: str | None, src_path: str, dst_box: str | None, dst_path: str, url: str | None
) -> int:
    async with await connect(url) as client:
        if dst_box is not None:
            files = Files(client, dst_box)
            if src_path == "-":
                return (await files.write(dst_path, sys.stdin.buffer.read())).size
            return (await files.upload(Path(src_path), dst_path)).size
        assert src_box is not None
        files = Files(client, src_box)
        if dst_path == "-":
            size = 0
            async for chunk in files.stream(src_path):
                sys.stdout.buffer.write(chunk)
                size += len(chunk)
            sys.stdout.buffer.flush()
            return size
        target = anyio.Path(dst_path)
        if await target.is_dir():
            target = target / Path(src_path).name
        return await files.download(src_path, Path(target))
