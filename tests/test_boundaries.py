"""Layering: the SDK loads no server code, and only the server speaks HTTP.

The client library must stay small: the wire types and an HTTP client. The core
(manager, Judges, Nyx, the fleet's coordinator) raises the domain errors of
`tartarus.errors`; the server alone turns them into problem+json.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tartarus

PACKAGE = Path(tartarus.__file__).resolve().parent

# Packages a client import must never load: they are the server and what it runs.
SERVER_SIDE = {"server", "node", "fleet", "runtime", "images"}
MAX_CLIENT_MODULES = 25

CLIENT_IMPORTS = [
    "import tartarus",
    "import tartarus.sdk",
    "import tartarus.sync",
    # What a user's first line loads: the package's lazy names resolve to these.
    "from tartarus import Sandbox",
    "import tartarus.sdk.snapshots",
    "from tartarus.compat.e2b import Sandbox",
    "import tartarus.mcp_server.server",
]


def _loaded_by(statement: str) -> list[str]:
    """The tartarus modules a fresh interpreter has loaded after `statement`."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return [m for m in out.split() if m == "tartarus" or m.startswith("tartarus.")]


@pytest.mark.parametrize("statement", CLIENT_IMPORTS)
def test_a_client_import_loads_only_client_modules(statement: str) -> None:
    loaded = _loaded_by(statement)
    server_side = [m for m in loaded if m.partition(".")[2].partition(".")[0] in SERVER_SIDE]
    assert server_side == [], f"{statement} loads {server_side}"
    assert len(loaded) <= MAX_CLIENT_MODULES, f"{statement} loads {len(loaded)}: {loaded}"


# The fleet's HTTP edges, which serve or forward requests by nature: its routes and
# middleware (mounted on the API server), the reverse proxy that streams requests to
# nodes, and the node agent's and host metrics' route tables. What they call raises
# `tartarus.errors`; the coordinator behind them imports no aiohttp.web.
HTTP_EDGES = {"fleet/routes.py", "fleet/proxy.py", "fleet/node_agent.py", "fleet/host_metrics.py"}
# The core: it names no part of the server.
CORE = (
    "node/",
    "network/",
    "policy/",
    "snapshots/",
    "runtime/",
    "scheduling/",
    "queue/",
    "images/",
)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, and `module.name` for each `from module import name`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_server_speaks_http() -> None:
    offenders: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        if where.startswith("server/"):
            continue
        for name in sorted(_imports(path)):
            web = name == "aiohttp.web" or name.startswith(("aiohttp.web.", "aiohttp.web_"))
            server = name.startswith("tartarus.server")
            if (
                name.startswith("tartarus.server.problems")
                or (web and where not in HTTP_EDGES)
                or (server and where.startswith(CORE))
            ):
                offenders.append(f"{where}: {name}")
    assert offenders == []
