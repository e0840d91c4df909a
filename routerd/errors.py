"""Errors that reach clients, each carrying the OpenAI error fields and its HTTP status.

The core raises these; ``routerd.api.errors`` renders them. Keeping the status next
to the meaning means a new failure mode is classified once, where it is raised,
instead of in a growing mapping inside the HTTP layer.
"""

from __future__ import annotations

from typing import Any


def openai_error_type(status: int) -> str:
    """The OpenAI ``type`` of an error answered with ``status``, as OpenAI's API uses them:
    429 is ``rate_limit_error``, any other client error ``invalid_request_error``, and a
    server error ``server_error``."""
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


class RouterdError(Exception):
    """Base: a failure a client should see as ``{"error": {...}}`` with ``status``.

    A subclass states its status and code in its class line, ``class
    NotFound(RouterdError, status=404, code="not_found")``, and its ``type`` follows
    from the status (``openai_error_type``), so the three cannot disagree. A subclass
    that states neither keeps its parent's.
    """

    status = 500
    type = "server_error"
    code: str | None = None

    def __init_subclass__(
        cls, *, status: int | None = None, code: str | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status = status
            cls.type = openai_error_type(status)
        if code is not None:
            cls.code = code

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


class BadRequest(RouterdError, status=400):
    """The request itself is wrong (a field, a value, a model that cannot do it)."""


class PayloadTooLarge(RouterdError, status=413, code="request_too_large"):
    """The body is larger than ``server.max_body_bytes``."""


class ModelNotFound(RouterdError, status=404, code="model_not_found"):
    """No registered version answers to the model id."""


class NotFound(RouterdError, status=404, code="not_found"):
    """What an admin request names is not there: an instance, a shadow, a rollout."""


class Conflict(RouterdError, status=409, code="conflict"):
    """The change contradicts the current state (say, a rollout already in progress)."""


class Unavailable(RouterdError, status=503, code="unavailable"):
    """No capacity, a failed load, or shutting down: the client may retry later."""


class LoadFailed(Unavailable, code="model_load_failed"):
    """The version could not be loaded (or woken); the reason is in the message."""


class Draining(Unavailable, code="draining"):
    """routerd is shutting down and takes no new requests."""


class GatewayTimeout(RouterdError, status=504, code="timeout"):
    """The request ran past its deadline (``server.request_timeout``)."""


class QueueFull(RouterdError, status=429, code="queue_full"):
    """Too many requests already wait for this model version: retry after ``retry_after``."""


class Unauthorized(RouterdError, status=401, code="invalid_api_key"):
    """No valid ``Authorization: Bearer`` key (answered with ``WWW-Authenticate``)."""


class Forbidden(RouterdError, status=403, code="forbidden"):
    """The admin API over TCP where no ``server.admin_token`` allows it."""


class TooManyStreams(RouterdError, status=429, code="too_many_streams"):
    """``server.max_streams`` streaming responses are open; the client may retry soon."""


class StoreUnavailable(Unavailable, code="store_unavailable"):
    """The database cannot be written now (locked by another process, disk full…)."""


class ClientClosed(RouterdError, status=499, code="client_closed_request"):
    """The client closed its connection while its request waited (nginx's 499): the
    answer goes nowhere, and the wait it gave up is not kept alive for it."""
