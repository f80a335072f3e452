"""Scrubs secret values out of text that leaves the server: logs, errors, audit entries.

Values are registered when they are resolved; anything at least `MIN_LENGTH`
characters long is replaced by `***` wherever it appears (shorter values would
redact ordinary words; docs/auth.md says to use longer secrets).
"""

from __future__ import annotations

import logging
import re

MIN_LENGTH = 4
MASK = "***"
# Bounded so a long-running server does not grow without limit.
MAX_VALUES = 10_000


class _Registry:
    def __init__(self) -> None:
        self.values: dict[str, None] = {}
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < MIN_LENGTH or value in self.values:
            return
        if len(self.values) >= MAX_VALUES:
            self.values.pop(next(iter(self.values)))
        self.values[value] = None
        # Longest first, so a value containing another is masked whole.
        ordered = sorted(self.values, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(v) for v in ordered))


_registry = _Registry()


def register(value: str) -> None:
    _registry.add(value)


def redact(text: str) -> str:
    pattern = _registry.pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites a log record's message (and traceback) with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _registry.pattern is None:
            return True
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Adds the filter to every handler of the root logger (call after configuring it)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
