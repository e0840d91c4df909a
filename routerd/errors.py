"""Errors that reach clients, each carrying the OpenAI error fields and its HTTP status.

The core raises these; ``routerd.api.errors`` renders them. Keeping the status next
to the meaning means a new failure mode is classified once, where it is raised,
instead of in a growing mapping inside the HTTP layer.
"""

from __future__ import annotations


class RouterdError(Exception):
    """Base: a failure a client should see as ``{"error": {...}}`` with ``status``."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class BadRequest(RouterdError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(RouterdError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ModelNotFound(RouterdError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(RouterdError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(RouterdError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Unavailable(RouterdError):
    """No capacity, a failed load, or shutting down: the client may retry later."""

    status = 503
    type = "server_error"
    code = "unavailable"


class LoadFailed(Unavailable):
    code = "model_load_failed"


class Draining(Unavailable):
    code = "draining"


class GatewayTimeout(RouterdError):
    status = 504
    type = "server_error"
    code = "timeout"


class QueueFull(RouterdError):
    """Too many requests already wait for this model version: retry after ``retry_after``."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class Unauthorized(RouterdError):
    """No valid ``Authorization: Bearer`` key (answered with ``WWW-Authenticate``)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(RouterdError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class TooManyStreams(RouterdError):
    """``server.max_streams`` streaming responses are open; the client may retry soon."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_streams"


class StoreUnavailable(Unavailable):
    """The database cannot be written now (locked by another process, disk full…)."""

    code = "store_unavailable"
