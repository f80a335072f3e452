"""schemathesis against the live server with the real backend: no 5xx, every response
as the OpenAPI document says (the committed run with more examples is
docs/api-fuzzing.md)."""

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
