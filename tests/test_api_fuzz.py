"""schemathesis against the live server with the real backend, every operation: no 5xx,
every response as the OpenAPI document says, stateful sequences through its links (the
committed run is docs/api-fuzzing.md). Deterministic: a fixed seed and few examples per
operation, so it takes a couple of minutes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fuzz import run
from tests.support.server import processes_mentioning, require_backend


@pytest.mark.timeout(1800)
def test_schemathesis_finds_nothing(tmp_path: Path) -> None:
    require_backend()
    command, code, output = run(max_examples=5, seed=7, workdir=tmp_path)
    assert code == 0, f"{' '.join(command)}\n{output}"
    assert processes_mentioning(str(tmp_path)) == []
