"""Exceptions shared by every Tartarus component."""

from __future__ import annotations


class TartarusError(Exception):
    """Base class: every error Tartarus raises on purpose derives from it."""


class BinaryNotFoundError(TartarusError):
    """A program Tartarus ships or needs could not be found; says where it looked."""

    def __init__(self, name: str, searched: list[str]) -> None:
        self.name = name
        self.searched = searched
        places = "\n  ".join(searched)
        super().__init__(f"cannot find {name!r}; looked in:\n  {places}")


class ConfigError(TartarusError):
    """The configuration file or environment holds a value Tartarus cannot use."""
