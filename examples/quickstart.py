"""Quick start: a sandbox from Python (what `make run` runs).

With no TARTARUS_URL set, the SDK starts the local server on first use (it keeps
running for the next client; `tartarus version` shows it).
"""

import anyio

from tartarus import Sandbox


async def main() -> None:
    async with Sandbox.create("base") as sb:
        print(f"sandbox {sb.id} on {sb.info.backend.value}: {sb.info.backend_reason}")
        result = await sb.commands.run("echo hello from a Tartarus sandbox; uname -sr; id")
        print(result.stdout, end="")
        await sb.files.write("/tmp/hello.txt", "written from the host\n")
        print(await sb.files.read("/tmp/hello.txt"), end="")
        print(f"exit code {result.exit_code}")


anyio.run(main)
