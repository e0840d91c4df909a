"""Each client-facing error keeps its HTTP status, OpenAI ``type`` and ``code``
(``routerd.errors``); clients and the tests of every endpoint rely on them. A body no
handler can take is a 400 saying why (``routerd.api.errors.decode_json_object``)."""

from __future__ import annotations

import math
import sys
from typing import Any

import pytest

from routerd import errors
from routerd.api.errors import decode_json_object
from routerd.errors import BadRequest, RouterdError

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


# -- bodies the API cannot take (routerd.api.errors.decode_json_object) -------------

DOUBLE_MAX = int(sys.float_info.max)  # 309 digits


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        (b"", None, "empty"),
        (b"[]", None, "must be a JSON object"),
        (b'"{}"', None, "must be a JSON object"),
        (b'{"a": "\xff"}', None, "not valid JSON"),  # not UTF-8
        (b'{"a": "\xed\xa0\x80"}', None, "not valid JSON"),  # a surrogate in UTF-8
        (b'\xef\xbb\xbf{"a": 1}', None, "not valid JSON"),  # a byte order mark
        (b"[" * 10_000 + b"]" * 10_000, None, "nested too deeply"),
        (b'{"prompt": "x\\ud800"}', "prompt", "lone surrogate"),
        (b'{"messages": [{"content": "\\uDFFF"}]}', "messages", "lone surrogate"),
        (b'{"stop": ["\\udbff\\udbff"]}', "stop", "lone surrogate"),  # two highs: no pair
        (b'{"logit_bias": {"\\ud800": 1}}', "logit_bias", "lone surrogate"),
        (b'{"\\ud800": 1}', None, "lone surrogate"),
        (b'{"seed": ' + str(DOUBLE_MAX + 1).encode() + b"}", None, "309 digits"),
        (b'{"seed": -1' + b"0" * 400 + b"}", None, "401 digits"),
        (b'{"seed": ' + b"9" * 5000 + b"}", None, "5000 digits"),  # past int's own limit
    ],
)
def test_bodies_the_api_cannot_take_are_a_400_saying_why(
    raw: bytes, param: str | None, says: str
) -> None:
    with pytest.raises(BadRequest, match=says) as caught:
        decode_json_object(raw)
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b'{"prompt": "\\ud83d\\ude00"}', {"prompt": "\U0001f600"}),  # a pair: one character
        (b'{"prompt": "\\\\ud800"}', {"prompt": "\\ud800"}),  # an escaped backslash
        (b'{"prompt": "' + b"1" * 400 + b'"}', {"prompt": "1" * 400}),  # digits in a string
        (b'{"seed": ' + str(DOUBLE_MAX).encode() + b"}", {"seed": DOUBLE_MAX}),
        (b'{"seed": -' + str(DOUBLE_MAX).encode() + b"}", {"seed": -DOUBLE_MAX}),
        (b'{"t": 1e309, "u": -0.0}', {"t": math.inf, "u": -0.0}),  # the parsers refuse inf
    ],
)
def test_bodies_the_api_can_take_are_read_as_written(raw: bytes, body: dict[str, Any]) -> None:
    assert decode_json_object(raw) == body
