"""Each client-facing error keeps its HTTP status, OpenAI ``type`` and ``code``
(``routerd.errors``); clients and the tests of every endpoint rely on them."""

from __future__ import annotations

import pytest

from routerd import errors
from routerd.errors import RouterdError

EXPECTED = {
    "RouterdError": (500, "server_error", None),
    "BadRequest": (400, "invalid_request_error", None),
    "PayloadTooLarge": (413, "invalid_request_error", "request_too_large"),
    "ModelNotFound": (404, "invalid_request_error", "model_not_found"),
    "NotFound": (404, "invalid_request_error", "not_found"),
    "Conflict": (409, "invalid_request_error", "conflict"),
    "Unavailable": (503, "server_error", "unavailable"),
    "LoadFailed": (503, "server_error", "model_load_failed"),
    "Draining": (503, "server_error", "draining"),
    "GatewayTimeout": (504, "server_error", "timeout"),
    "QueueFull": (429, "rate_limit_error", "queue_full"),
    "Unauthorized": (401, "invalid_request_error", "invalid_api_key"),
    "Forbidden": (403, "invalid_request_error", "forbidden"),
    "TooManyStreams": (429, "rate_limit_error", "too_many_streams"),
    "StoreUnavailable": (503, "server_error", "store_unavailable"),
    "ClientClosed": (499, "invalid_request_error", "client_closed_request"),
}


def test_every_error_class_is_listed() -> None:
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, RouterdError)
    }
    assert defined == set(EXPECTED)


@pytest.mark.parametrize(("name", "fields"), sorted(EXPECTED.items()))
def test_an_error_carries_its_status_type_and_code(
    name: str, fields: tuple[int, str, str | None]
) -> None:
    error = getattr(errors, name)("what went wrong", param="model")
    assert (error.status, error.type, error.code) == fields
    assert (error.message, error.param, error.retry_after) == ("what went wrong", "model", None)
    assert str(error) == "what went wrong"


def test_an_error_may_carry_its_own_code_and_retry_after() -> None:
    error = errors.Unavailable("busy", code="warming", retry_after=2.5)
    assert (error.status, error.type, error.code, error.retry_after) == (
        503,
        "server_error",
        "warming",
        2.5,
    )
    assert errors.Unavailable("busy").code == "unavailable"  # the class's code is untouched


def test_the_classes_nest_where_callers_catch_the_general_case() -> None:
    """``except Unavailable`` catches the 503s; no other error is a case of another."""
    parents = {name: getattr(errors, name).__bases__ for name in EXPECTED}
    unavailable = {"LoadFailed", "Draining", "StoreUnavailable"}
    assert parents.pop("RouterdError") == (Exception,)
    for name, bases in parents.items():
        expected = errors.Unavailable if name in unavailable else RouterdError
        assert bases == (expected,), name
