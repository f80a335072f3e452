"""Exceptions shared by every Tartarus component.

`RequestError` and its subclasses are what the core (the sandbox manager, the judges,
Nyx, the fleet) raises when it turns a request down on purpose. They say what went
wrong in the core's own terms; the server alone decides how that looks on the wire
(`tartarus.server.problems` maps each class to a status and a problem+json body).
"""

from __future__ import annotations

import errno
import sqlite3


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


class RequestError(TartarusError):
    """A request the core refuses on purpose.

    `slug` is the stable problem type clients match on (each class has a default);
    `detail` says what happened to a human; `retry_after` (seconds), when set, is
    when trying again may succeed.
    """

    slug = "request-error"

    def __init__(
        self, detail: str, *, slug: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if slug is not None:
            self.slug = slug
        self.retry_after = retry_after


class NotFoundError(RequestError):
    """The thing the request names does not exist (or the caller may not see it)."""

    slug = "not-found"


class ConflictError(RequestError):
    """The request does not fit the current state of what it names."""

    slug = "conflict"


class SandboxNotRunningError(ConflictError):
    """The sandbox exists but is not running (ended, stopping or not yet placed)."""

    slug = "sandbox-not-running"


class InvalidRequestError(RequestError):
    """The request is well-formed but asks for something that cannot be done."""

    slug = "invalid-request"


class RefusedError(RequestError):
    """The caller may not do this."""

    slug = "forbidden"


class AdmissionDeniedError(RefusedError):
    """Admission judges refused a create. Judges name the status of their refusal (403
    for policy, 429 for quota, a plugin's own choice), so it travels with the error."""

    slug = "admission-denied"

    def __init__(self, detail: str, *, status: int) -> None:
        super().__init__(detail)
        self.status = status


class OverloadedError(RequestError):
    """More work is waiting than is accepted now (a full queue); try again shortly."""

    slug = "overloaded"


class UnavailableError(RequestError):
    """This server cannot do it now (shutting down, no node could take it, a component
    it needs failed)."""

    slug = "unavailable"


class UpstreamUnreachableError(RequestError):
    """Another server this request must go through (a fleet node) did not answer."""

    slug = "upstream-unreachable"


class NodeRefusedError(RequestError):
    """The node that runs a sandbox turned down what a fleet's API server asked of it;
    the node's status and problem slug travel with the error, so the caller gets the
    node's answer as the node gave it."""

    slug = "node-refused"

    def __init__(self, detail: str, *, status: int, slug: str | None = None) -> None:
        super().__init__(detail, slug=slug)
        self.status = status


class InternalError(RequestError):
    """The core found its own state inconsistent; the detail says how."""

    slug = "internal"


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT, or SQLite's "database or disk is full" (SQLITE_FULL)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error)
