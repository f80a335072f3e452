"""Errors the SDK raises: one class per kind of problem the server reports."""

from __future__ import annotations

from tartarus.errors import TartarusError


class ApiError(TartarusError):
    """The server answered with a problem (RFC 9457); `status`, `type` and `detail` say
    which."""

    def __init__(
        self, status: int, type_: str, title: str, detail: str, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.type = type_
        self.title = title
        self.detail = detail
        # Seconds the server asked to wait before trying again (`Retry-After`), if any.
        self.retry_after = retry_after
        super().__init__(f"{title} ({status}): {detail}" if detail else f"{title} ({status})")


class NotFoundError(ApiError):
    """The sandbox, process, file or endpoint does not exist."""


class ConflictError(ApiError):
    """The request does not fit the current state, e.g. the sandbox is no longer running."""


class InvalidRequestError(ApiError):
    """The request was malformed or failed validation (400, 413, 422)."""


class AuthenticationError(ApiError):
    """Missing or wrong API key (401) or not the server's owner (403)."""


class PermissionDeniedError(AuthenticationError):
    """The caller is known but its roles do not allow this (403), or admission refused
    it on policy."""


class QuotaExceededError(ApiError):
    """Admission refused the request: the tenant's quota is used up (429)."""


class UnavailableError(ApiError):
    """The server cannot do it now (503): no backend, or it is shutting down."""


class ServerUnreachableError(TartarusError):
    """No server answered at the URL (or the local one could not be started)."""


def error_for(
    status: int, type_: str, title: str, detail: str, retry_after: float | None = None
) -> ApiError:
    cls: type[ApiError]
    if status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = ConflictError
    elif status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status == 429:
        cls = QuotaExceededError
    elif status == 503:
        cls = UnavailableError
    elif status in (400, 413, 422):
        cls = InvalidRequestError
    else:
        cls = ApiError
    return cls(status, type_, title, detail, retry_after)
