"""The core's domain errors (`tartarus.errors`) answer exactly the problem+json the
server's own `ApiError` with the same status, type and detail answers: same status,
body bytes and headers (Retry-After included)."""

from __future__ import annotations

import errno
import sqlite3

import pytest
import redis.exceptions
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tartarus.errors import (
    AdmissionDeniedError,
    ConflictError,
    InternalError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    RefusedError,
    RequestError,
    SandboxNotRunningError,
    UnavailableError,
    UpstreamUnreachableError,
)
from tartarus.node.manager import key_in_flight
from tartarus.policy.audit_log import AuditError
from tartarus.queue.base import QueueError
from tartarus.server.app import problem_middleware
from tartarus.server.problems import ApiError, from_exception

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Each as the core raises it, beside the ApiError the core used to raise for it.
CASES: list[tuple[RequestError, ApiError]] = [
    (NotFoundError("sandbox sb-1 not found"), ApiError(404, "not-found", "sandbox sb-1 not found")),
    (
        SandboxNotRunningError("sandbox sb-1 is stopped (exit 1)"),
        ApiError(409, "sandbox-not-running", "sandbox sb-1 is stopped (exit 1)"),
    ),
    (
        key_in_flight("acme/k1"),
        ApiError(
            409,
            "idempotency-key-in-flight",
            "a create with Idempotency-Key 'k1' is still running; retry shortly",
            headers={"Retry-After": "1"},
        ),
    ),
    (
        ConflictError("too big", slug="over-template-limits"),
        ApiError(409, "over-template-limits", "too big"),
    ),
    (
        InvalidRequestError("bad cursor", slug="invalid-cursor"),
        ApiError(422, "invalid-cursor", "bad cursor"),
    ),
    (RefusedError("n2 may not act for n1"), ApiError(403, "forbidden", "n2 may not act for n1")),
    (
        AdmissionDeniedError("minos: 3 of its 3", status=429),
        ApiError(429, "admission-denied", "minos: 3 of its 3"),
    ),
    (
        OverloadedError("lane main is full", slug="queue-full", retry_after=1),
        ApiError(429, "queue-full", "lane main is full", headers={"Retry-After": "1"}),
    ),
    (
        UnavailableError("still queued", slug="still-queued", retry_after=5),
        ApiError(503, "still-queued", "still queued", headers={"Retry-After": "5"}),
    ),
    (
        UnavailableError("the server is shutting down", slug="shutting-down"),
        ApiError(503, "shutting-down", "the server is shutting down"),
    ),
    (
        UpstreamUnreachableError("node n1 does not answer", slug="node-unreachable", retry_after=2),
        ApiError(502, "node-unreachable", "node n1 does not answer", headers={"Retry-After": "2"}),
    ),
    (
        InternalError("the record of sb-1 disappeared"),
        ApiError(500, "internal", "the record of sb-1 disappeared"),
    ),
]


@pytest.mark.parametrize(("domain", "api"), CASES, ids=lambda e: type(e).__name__)
async def test_a_domain_error_answers_what_its_api_error_did(
    domain: RequestError, api: ApiError
) -> None:
    async def raise_domain(request: web.Request) -> web.Response:
        raise domain

    async def raise_api(request: web.Request) -> web.Response:
        raise api

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/v1/x", raise_domain)
    app.router.add_get("/v1/y", raise_api)
    async with TestClient(TestServer(app)) as client:
        got = await client.get("/v1/x")
        got_body = await got.read()
        want = await client.get("/v1/y")
        want_body = await want.read()
    assert got.status == want.status == api.status
    # Only `instance`, the request's path, may differ.
    assert got_body == want_body.replace(b"/v1/y", b"/v1/x")
    assert got.headers.get("Retry-After") == want.headers.get("Retry-After")
    assert got.headers["Content-Type"] == want.headers["Content-Type"]


def _chained(outer: Exception, cause: BaseException) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("error", "slug"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk-full"),
        (sqlite3.OperationalError("database or disk is full"), "disk-full"),
        # The judges' refusal when the audit log cannot be written: the disk behind it.
        (
            _chained(
                UnavailableError("admission needs the audit log, which failed"),
                AuditError("cannot write the audit log: database or disk is full"),
            ),
            "audit-unavailable",
        ),
        (
            _chained(
                AuditError("cannot write the audit log"),
                sqlite3.OperationalError("database or disk is full"),
            ),
            "disk-full",
        ),
        (AuditError("cannot write the audit log: locked"), "audit-unavailable"),
    ],
)
def test_a_full_disk_and_a_failing_audit_log_are_503_with_retry_after(
    error: Exception, slug: str
) -> None:
    """Trying again helps once there is room: never a 500."""
    problem = from_exception(error)
    assert problem is not None
    assert (problem.status, problem.slug) == (503, slug)
    assert problem.headers == {"Retry-After": "5"}


def test_other_os_errors_stay_unexpected() -> None:
    assert from_exception(OSError(errno.EIO, "I/O error")) is None


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("Connection closed by server."),
        redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        # A queue's own error, raised from the Redis failure under it.
        _chained(
            QueueError("queue 'lanes': Redis failed: Connection closed by server."),
            redis.exceptions.ConnectionError("Connection closed by server."),
        ),
    ],
)
def test_the_fleets_redis_out_of_reach_is_a_503_with_retry_after(error: Exception) -> None:
    """Redis restarting or unreachable: trying again shortly helps, so never a 500."""
    problem = from_exception(error)
    assert problem is not None
    assert (problem.status, problem.slug) == (503, "state-unavailable")
    assert problem.headers == {"Retry-After": "1"}
    assert from_exception(redis.exceptions.ResponseError("WRONGTYPE")) is None
