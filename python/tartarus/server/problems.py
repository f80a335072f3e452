"""RFC 9457 problem details: every error the API returns is `application/problem+json`.

Handlers raise `ApiError`; the core raises the domain errors of `tartarus.errors`
(or a `TartarusError` the mappings below know). `from_exception` is the one place
they become problems; the middleware in `tartarus.server.app` renders them. Unknown
exceptions become a 500 whose body says nothing about the server's internals.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import msgspec
from aiohttp import web

from tartarus.api.types import PROBLEM_MEDIA, Problem, ProblemField
from tartarus.errors import (
    AdmissionDeniedError,
    ConflictError,
    InternalError,
    InvalidRequestError,
    NodeRefusedError,
    NotFoundError,
    OverloadedError,
    RefusedError,
    RequestError,
    UnavailableError,
    UpstreamUnreachableError,
    is_disk_full,
)
from tartarus.fleet.state import is_outage
from tartarus.images.errors import ImageError, TemplateNotFoundError
from tartarus.policy.audit_log import AuditError
from tartarus.runtime.base import (
    BackendUnavailableError,
    ExecTimeoutError,
    NoNetworkError,
    NotSupportedError,
    SandboxError,
    SandboxNotFoundError,
)
from tartarus.secrets.providers import SecretError
from tartarus.secrets.redaction import redact

TYPE_BASE = "https://tartarus.dev/problems/"

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error with an HTTP status and a problem type slug (`TYPE_BASE` + slug)."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        errors: list[ProblemField] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


def not_found(what: str) -> ApiError:
    return ApiError(404, "not-found", f"{what} not found")


def problem_response(
    status: int,
    slug: str,
    detail: str,
    *,
    instance: str = "",
    errors: list[ProblemField] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = Problem(
        type=TYPE_BASE + slug,
        title=HTTPStatus(status).phrase,
        status=status,
        # Secrets never leave in an error, whatever raised it.
        detail=redact(detail),
        instance=instance,
        errors=errors,
    )
    return web.Response(
        status=status,
        body=_encoder.encode(body),
        content_type=PROBLEM_MEDIA,
        headers=headers,
    )


_PATH_IN_MESSAGE = re.compile(r"- at (?:`key` in )?`(\$[^`]*)`$")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


def validation_problem(error: msgspec.ValidationError, where: str) -> ApiError:
    """A 422 naming the offending field as a JSON pointer (`$.a.b` → `/a/b`)."""
    message = str(error)
    match = _PATH_IN_MESSAGE.search(message)
    pointer = ""
    if match:
        pointer = match.group(1).removeprefix("$").replace(".", "/").replace("[", "/")
        pointer = pointer.replace("]", "")
        message = message[: match.start()].rstrip()
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        pointer += "/" + unknown.group(1)
    return ApiError(
        422,
        "invalid-" + where.replace(" ", "-"),
        f"invalid {where}: {message}" + (f" at {pointer}" if pointer else ""),
        errors=[ProblemField(pointer=pointer, detail=message)],
    )


# Most specific first: the first matching class decides the status.
_EXCEPTION_PROBLEMS: tuple[tuple[type[BaseException], int, str], ...] = (
    (SandboxNotFoundError, 404, "not-found"),
    (TemplateNotFoundError, 404, "template-not-found"),
    # The template could not be built (a download, a build script): the host's problem.
    (ImageError, 503, "template-unavailable"),
    (SecretError, 503, "secret-unavailable"),
    (NotSupportedError, 409, "not-supported"),
    (NoNetworkError, 409, "no-network"),
    (BackendUnavailableError, 503, "backend-unavailable"),
    (ExecTimeoutError, 408, "timeout"),
    (FileNotFoundError, 404, "file-not-found"),
    (IsADirectoryError, 409, "file-conflict"),
    (NotADirectoryError, 409, "file-conflict"),
    (FileExistsError, 409, "file-conflict"),
    (PermissionError, 403, "permission-denied"),
    (SandboxError, 409, "sandbox-error"),
)


# The core's refusals: the class decides the status, the error its slug and detail.
_REQUEST_STATUS: tuple[tuple[type[RequestError], int], ...] = (
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidRequestError, 422),
    (RefusedError, 403),
    (OverloadedError, 429),
    (UnavailableError, 503),
    (UpstreamUnreachableError, 502),
    (InternalError, 500),
)


def _request_problem(exc: RequestError) -> ApiError:
    if isinstance(exc, AdmissionDeniedError | NodeRefusedError):
        status = exc.status  # the refusing judges (or node) chose it
    else:
        status = next((s for cls, s in _REQUEST_STATUS if isinstance(exc, cls)), 500)
    headers = None if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    return ApiError(status, exc.slug, exc.detail, headers=headers)


# The agent's stable error codes (docs/protocol.md), for errors that carry one.
_AGENT_CODES: dict[str, tuple[int, str]] = {
    "not_found": (404, "file-not-found"),
    "no_such_process": (404, "no-such-process"),
    "no_such_handle": (404, "not-found"),
    "permission_denied": (403, "permission-denied"),
    "already_exists": (409, "file-conflict"),
    "not_a_directory": (409, "file-conflict"),
    "is_a_directory": (409, "file-conflict"),
    "not_empty": (409, "file-conflict"),
    "busy": (409, "busy"),
    "invalid_argument": (409, "invalid-argument"),
    "too_large": (413, "too-large"),
    "io": (409, "sandbox-io-error"),
    "shutting_down": (409, "sandbox-not-running"),
    "connection": (409, "sandbox-not-running"),
}


# The host's disk is full (the state database, the audit log, a sandbox's files on the
# host): nothing is wrong with the request, and it can be tried again once there is room.
DISK_FULL_RETRY_S = 5


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and what it was raised from (`raise ... from`), nearest first: an error
    raised while another was being handled is not caused by it."""
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(out) < 8:
        out.append(seen)
        seen = seen.__cause__
    return out


def _host_problem(exc: BaseException) -> ApiError | None:
    """The host cannot do it now (a full disk, the audit log, the fleet's Redis): 503,
    try again later."""
    retry = {"Retry-After": str(DISK_FULL_RETRY_S)}
    chain = _causes(exc)
    if (full := next((e for e in chain if is_disk_full(e)), None)) is not None:
        detail = f"the server's disk is full; try again once there is room ({full})"
        return ApiError(503, "disk-full", detail, headers=retry)
    if any(isinstance(e, AuditError) for e in chain):
        # Nothing is recorded without the audit log, and nothing is done unrecorded.
        return ApiError(503, "audit-unavailable", str(exc), headers=retry)
    if (outage := next((e for e in chain if is_outage(e)), None)) is not None:
        # The fleet's shared state (Redis) is restarting or unreachable.
        detail = f"the fleet's shared state cannot be reached; try again shortly ({outage})"
        return ApiError(503, "state-unavailable", detail, headers={"Retry-After": "1"})
    return None


def from_exception(exc: BaseException) -> ApiError | None:
    """Maps the core's and the runtime's errors to problems; None for anything
    unexpected (a 500)."""
    if isinstance(exc, ApiError):
        return exc
    # A template build says more about its own full disk.
    if not isinstance(exc, ImageError) and (host := _host_problem(exc)) is not None:
        return host
    if isinstance(exc, RequestError):
        return _request_problem(exc)
    code = getattr(exc, "code", None)
    if isinstance(exc, SandboxError) and isinstance(code, str) and code in _AGENT_CODES:
        status, slug = _AGENT_CODES[code]
        return ApiError(status, slug, str(exc))
    for cls, status, slug in _EXCEPTION_PROBLEMS:
        if isinstance(exc, cls):
            return ApiError(status, slug, str(exc))
    return None
