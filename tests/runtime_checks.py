"""Expectations shared by the backend tests."""

from __future__ import annotations


def expected_flood(size: int) -> bytes:
    """What `flood N` (wasm toolbox) and its shell twin print: byte i is i mod 251."""
    pattern = bytes(range(251))
    return (pattern * (size // 251 + 1))[:size]
