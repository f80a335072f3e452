"""An MCP client session: the `mcp` SDK's client launches `tartarus mcp` over stdio and
uses its tools as an agent would (docs/mcp.md).

It talks to the server that TARTARUS_URL names (with TARTARUS_API_KEY if set), else to
the local one.
"""

import json
import os
import sys

import anyio
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.types import CallToolResult, TextContent


def text_of(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def main() -> None:
    server = StdioServerParameters(
        command=sys.executable, args=["-m", "tartarus", "mcp"], env=dict(os.environ)
    )
    async with Client(server, read_timeout_seconds=120) as client:
        tools = [tool.name for tool in (await client.list_tools()).tools]
        print("tools:", ", ".join(sorted(tools)))
        created = json.loads(text_of(await client.call_tool("create_sandbox", {})))
        sandbox_id = created["sandbox_id"]
        print(f"sandbox {sandbox_id} on {created['backend']}")
        try:
            await client.call_tool("run_code", {"sandbox_id": sandbox_id, "code": "n = 6 * 7"})
            answer = await client.call_tool(
                "run_code", {"sandbox_id": sandbox_id, "code": "f'the answer is {n}'"}
            )
            print(json.loads(text_of(answer))["text"])
        finally:
            await client.call_tool("kill_sandbox", {"sandbox_id": sandbox_id})
        print("killed")


anyio.run(main)
