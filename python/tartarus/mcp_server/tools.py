"""What each MCP tool does, on the SDK: plain async functions of an API client.

Replies are bounded (an agent's context is small and a sandbox's output is not): output
past `MAX_OUTPUT_CHARS` is cut with a note, and files past `MAX_FILE_BYTES` are refused.
"""

from __future__ import annotations

import base64
from typing import Any

from tartarus.api.sandbox import SandboxState
from tartarus.api.types import CodeExecution, CodeLanguage
from tartarus.errors import TartarusError
from tartarus.sdk.client import Client
from tartarus.sdk.sandbox import Sandbox

MAX_OUTPUT_CHARS = 64 * 1024
MAX_FILE_BYTES = 1 << 20
MAX_LISTED_FILES = 1000
# The metadata key that marks a sandbox as made by this server, for one client (a hash
# of its identity), so `max_sandboxes` counts what the API says is running.
CLIENT_LABEL = "tartarus.mcp-client"


class ToolInputError(TartarusError):
    """A tool call's arguments that the API would refuse, said in the tool's words."""


def clip(text: str) -> str:
    if len(text) <= MAX_OUTPUT_CHARS:
        return text
    cut = len(text) - MAX_OUTPUT_CHARS
    return text[:MAX_OUTPUT_CHARS] + f"\n[... {cut} more characters not shown]"


async def running_sandboxes_of(client: Client, label: str) -> int:
    listed = await Sandbox.list(
        state=[SandboxState.RUNNING, SandboxState.PAUSED],
        metadata={CLIENT_LABEL: label},
        client=client,
    )
    return len(listed)


async def create_sandbox(
    client: Client, label: str, *, template: str, timeout_s: float, network: bool
) -> dict[str, Any]:
    sandbox = await Sandbox.create(
        template,
        timeout=timeout_s,
        network=network,
        metadata={CLIENT_LABEL: label},
        client=client,
    )
    return {
        "sandbox_id": sandbox.id,
        "template": sandbox.info.template,
        "backend": str(sandbox.info.backend),
        "timeout_s": timeout_s,
    }


async def run_command(
    client: Client, sandbox_id: str, command: str, *, timeout_s: float, cwd: str | None
) -> dict[str, Any]:
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    result = await sandbox.commands.run(command, timeout=timeout_s, cwd=cwd)
    return {
        "exit_code": result.exit_code,
        "stdout": clip(result.stdout),
        "stderr": clip(result.stderr),
        "error": result.error,
    }


def describe_execution(execution: CodeExecution) -> dict[str, Any]:
    results = []
    for r in execution.results:
        formats = {
            name: value
            for name, value in (
                ("text", r.text),
                ("html", r.html),
                ("markdown", r.markdown),
                ("json", r.json),
                ("latex", r.latex),
                ("data", r.data),
                ("svg", r.svg),
            )
            if value is not None
        }
        images = [name for name, value in (("png", r.png), ("jpeg", r.jpeg)) if value]
        results.append(
            {"main": r.is_main_result, **{k: clip(v) for k, v in formats.items()}}
            | ({"images": images} if images else {})
        )
    reply: dict[str, Any] = {
        "text": execution.text,
        "stdout": clip("".join(execution.stdout)),
        "stderr": clip("".join(execution.stderr)),
        "results": results,
        "execution_count": execution.execution_count,
    }
    if execution.error is not None:
        reply["error"] = {
            "name": execution.error.name,
            "value": execution.error.value,
            "traceback": clip(execution.error.traceback),
        }
    return reply


async def run_code(
    client: Client, sandbox_id: str, code: str, *, language: CodeLanguage, timeout_s: float
) -> CodeExecution:
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    return await sandbox.run_code(code, language=language, timeout=timeout_s)


async def read_file(client: Client, sandbox_id: str, path: str) -> str:
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    info = await sandbox.files.get_info(path)
    if info.size > MAX_FILE_BYTES:
        raise ToolInputError(
            f"{path} is {info.size} bytes; this tool reads files up to {MAX_FILE_BYTES} "
            "(read a part with run_command, e.g. head -c)"
        )
    data = await sandbox.files.read(path, format="bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ToolInputError(
            f"{path} is not UTF-8 text (inspect it with run_command, e.g. xxd)"
        ) from None


async def write_file(client: Client, sandbox_id: str, path: str, content: str) -> dict[str, Any]:
    if len(content.encode()) > MAX_FILE_BYTES:
        raise ToolInputError(f"content over {MAX_FILE_BYTES} bytes")
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    written = await sandbox.files.write(path, content)
    return {"path": written.path, "size": written.size}


async def list_files(client: Client, sandbox_id: str, path: str) -> list[dict[str, Any]]:
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    entries = await sandbox.files.list(path)
    return [
        {"name": e.name, "kind": str(e.kind), "size": e.size} for e in entries[:MAX_LISTED_FILES]
    ]


async def kill_sandbox(client: Client, sandbox_id: str) -> dict[str, Any]:
    sandbox = await Sandbox.connect(sandbox_id, client=client)
    await sandbox.kill()
    return {"sandbox_id": sandbox_id, "killed": True}


def decode_image(data: str) -> bytes:
    return base64.b64decode(data)
