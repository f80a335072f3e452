"""The Python mirrors of Rust configurations against shared vectors
(tests/vectors/config/, written and checked by the Rust crates' `config_vectors`
tests): each decodes the document as written and in canonical form to the same value,
and encodes back exactly the canonical JSON, so a field, default or spelling that
differs on one side fails here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tartarus import codec
from tartarus.runtime import jail, vmm_api, vmm_jail
from tests.conftest import REPO_ROOT

VECTORS = sorted((REPO_ROOT / "tests" / "vectors" / "config").glob("*.json"))
TYPES: dict[str, type[msgspec.Struct]] = {
    "MachineConfig": vmm_api.MachineConfig,
    "VmmJailConfig": vmm_jail.JailConfig,
    "JailConfig": jail.JailConfig,
}
# tartarus-jail options Python never sets: Rust's defaults apply.
RUST_ONLY: dict[str, set[str]] = {
    "JailConfig": {"user_namespace", "rlimits", "capabilities", "seccomp", "cwd", "uid", "gid"},
}


def load(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    doc = json.loads(path.read_text())
    rust_only = RUST_ONLY.get(doc["type"], set())

    def mirrored(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in rust_only}

    return doc["type"], mirrored(doc["written"]), mirrored(doc["canonical"])


def test_every_mirrored_type_has_full_minimal_and_edge_vectors() -> None:
    types = [json.loads(p.read_text())["type"] for p in VECTORS]
    assert set(types) == set(TYPES)
    assert all(types.count(t) >= 3 for t in TYPES)


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector_round_trips_through_the_python_mirror(path: Path) -> None:
    type_name, written, canonical = load(path)
    cls = TYPES[type_name]
    fields = {f.encode_name for f in msgspec.structs.fields(cls)}
    assert fields == set(canonical), "field sets differ between Rust and Python"
    value = codec.convert(canonical, cls)
    assert codec.convert(written, cls) == value, "defaults differ between Rust and Python"
    assert json.loads(codec.to_json(value)) == canonical


def test_rust_only_jail_options_are_still_rust_options() -> None:
    doc = json.loads((REPO_ROOT / "tests" / "vectors" / "config" / "jail_full.json").read_text())
    assert RUST_ONLY["JailConfig"] <= set(doc["canonical"])
