"""Content digests (`sha256:<hex>`): parsing, streaming hashing and file hashing."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tartarus.images.errors import DigestMismatchError, ImageError

ALGORITHM = "sha256"
_DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


def parse_digest(value: str) -> str:
    """Returns `value` if it is a well-formed sha256 digest, else raises ImageError."""
    if not _DIGEST_RE.fullmatch(value):
        raise ImageError(f"malformed digest {value!r}: expected sha256:<64 lowercase hex digits>")
    return value


def hex_of(digest: str) -> str:
    return parse_digest(digest).removeprefix("sha256:")


def of_bytes(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def of_file(path: Path) -> str:
    with path.open("rb") as f:
        return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


class Hasher:
    """Incremental sha256 that also counts bytes, for streamed downloads."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return f"sha256:{self._h.hexdigest()}"

    def verify(self, what: str, expected: str, expected_size: int | None = None) -> None:
        actual = self.digest()
        if actual != expected:
            raise DigestMismatchError(what, expected, actual)
        if expected_size is not None and self.size != expected_size:
            raise ImageError(f"{what}: got {self.size} bytes, the descriptor says {expected_size}")
