"""Errors of authentication and authorisation (the middleware maps them to 401/403)."""

from __future__ import annotations

from tartarus.errors import TartarusError


class AuthenticationError(TartarusError):
    """The credentials are missing, malformed, expired or not trusted (HTTP 401)."""


class ForbiddenError(TartarusError):
    """The caller is known but may not do this (HTTP 403)."""
