"""msgspec hooks shared by every wire and config type.

msgspec handles Structs, enums and datetimes itself; these hooks add `pathlib.Path`,
which config and API types use, in both directions.
"""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, TypeVar

import msgspec


def enc_hook(obj: Any) -> Any:
    if isinstance(obj, PurePath):
        return str(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def dec_hook(type_: type, obj: Any) -> Any:
    if type_ is Path:
        if isinstance(obj, str):
            return Path(obj)
        raise TypeError(f"expected a path string, got {type(obj).__name__}")
    raise NotImplementedError(f"cannot decode {type_!r}")


T = TypeVar("T")


def convert(obj: Any, type_: type[T], *, strict: bool = True) -> T:
    """`msgspec.convert` with the shared hooks."""
    return msgspec.convert(obj, type_, strict=strict, dec_hook=dec_hook)


def to_json(obj: Any) -> bytes:
    return msgspec.json.encode(obj, enc_hook=enc_hook)
