"""Layering: the SDK loads no server code.

The client library must stay small: the wire types and an HTTP client.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Packages a client import must never load: they are the server and what it runs.
SERVER_SIDE = {"server", "agent", "fleet", "runtime", "images"}
MAX_CLIENT_MODULES = 25

CLIENT_IMPORTS = [
    "import tartarus",
    "import tartarus.sdk",
    "import tartarus.sync",
    # What a user's first line loads: the package's lazy names resolve to these.
    "from tartarus import Sandbox",
    "import tartarus.sdk.snapshots",
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
