"""Every failure leaves as an OpenAI-shaped error with the right status (DESIGN.md rule 7).

The request middleware (``routerd.api.middleware``) does it for all routes through
:func:`response_for`, so a handler raises and never builds an error response itself,
and aiohttp's own errors (unknown route, wrong method, body too large) come out in the
same shape as ours.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from contract.errors import BackendError, InvalidRequest
from routerd.errors import BadRequest, PayloadTooLarge, RouterdError, StoreUnavailable
from routerd.request_log import note_error
from state import StoreError

log = logging.getLogger("routerd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: RouterdError) -> web.Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(
        error_body(error.message, type=error.type, param=error.param, code=error.code),
        status=error.status,
        headers=headers,
    )


def as_routerd_error(exc: BaseException) -> RouterdError:
    """Classify any exception a handler let through."""
    if isinstance(exc, RouterdError):
        return exc
    if isinstance(exc, InvalidRequest):
        return BadRequest(str(exc), param=exc.param)
    if isinstance(exc, StoreError):  # e.g. the database locked by another process
        return StoreUnavailable(str(exc), retry_after=1)
    if isinstance(exc, BackendError):
        return RouterdError(f"backend error: {exc}")
    return RouterdError("internal error; see the routerd log")


def response_for(exc: Exception, request: web.Request) -> web.Response:
    """The OpenAI-shaped answer for what a handler raised (logged when it is our fault),
    its code noted for the request log.

    Called by the request middleware (``routerd.api.middleware``) for every exception
    but cancellation and aiohttp's redirects, which it lets through.
    """
    if isinstance(exc, web.HTTPException):
        return _http_exception_response(exc)
    error = as_routerd_error(exc)
    if error.status >= 500 and not isinstance(exc, RouterdError):
        log.error("%s %s failed", request.method, request.path, exc_info=exc)
    note_error(error.code or error.type, error.message)
    return error_response(error)


def _http_exception_response(exc: web.HTTPException) -> web.Response:
    status_types = {413: ("request_too_large", "invalid_request_error")}
    code, type_ = status_types.get(
        exc.status, (None, "invalid_request_error" if exc.status < 500 else "server_error")
    )
    code = code or _default_code(exc.status)
    message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    note_error(code or type_, message or exc.reason)
    response = web.json_response(
        error_body(message or exc.reason, type=type_, code=code),
        status=exc.status,
    )
    if exc.status == 405 and "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def _default_code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed"}.get(status)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400/413 saying what is wrong with it
    (``decode_json_object``)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"request body is larger than the limit of {request.client_max_size} bytes"
        ) from None
    return decode_json_object(raw)


def decode_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 saying what is wrong with it.

    Beyond JSON's grammar, the body must be what every JSON peer can read (I-JSON,
    RFC 7493): its strings Unicode text, which a lone UTF-16 surrogate escape such as
    ``"\\ud800"`` is not (no UTF-8 can encode it, so no tokenizer, log or answer can
    carry it), and its numbers within a double's range (Python reads an integer literal
    of any length exactly; every float conversion of it overflows).
    """
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        text = raw.decode()  # JSON between systems is UTF-8 (RFC 8259)
        if _LONG_DIGITS.search(raw):  # rare: only then is each integer literal checked
            body = json.loads(text, parse_int=_bounded_int)
        else:
            body = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # the decoder recurses per level of nesting
        raise BadRequest("request body is nested too deeply") from None
    except _NumberOutOfRange as exc:
        raise BadRequest(
            f"request body holds an integer of {exc.digits} digits, beyond the range of a "
            "JSON number (a double, at most about 1.8e308 in size)"
        ) from None
    except ValueError as exc:  # any other value the decoder cannot build
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # else no string of the body can hold a surrogate
        _refuse_lone_surrogates(body)
    return body


_DOUBLE_DIGITS: Final = len(str(int(sys.float_info.max)))  # 309
_LONG_DIGITS: Final = re.compile(rb"[0-9]{%d}" % _DOUBLE_DIGITS)
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class _NumberOutOfRange(Exception):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _bounded_int(text: str) -> int:
    """An integer literal of the body, refused beyond a double's range (and so before
    ``int`` meets one longer than Python's limit on digits, a ValueError)."""
    digits = len(text) - text.startswith("-")  # JSON has no leading zeros
    if digits > _DOUBLE_DIGITS:
        raise _NumberOutOfRange(digits)
    value = int(text)
    if digits == _DOUBLE_DIGITS and abs(value) > sys.float_info.max:
        raise _NumberOutOfRange(digits)
    return value


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """A 400 naming the field whose key or value holds a lone surrogate, if one does.

    Pairs of surrogate escapes are one character once decoded (an emoji, say), so only
    a lone one is found here. The walk keeps its own stack: no recursion per level.
    """
    for key, value in body.items():
        if _SURROGATE.search(key):
            raise BadRequest(
                f"request body has a key holding a lone surrogate ({_shown(key)}); "
                "JSON text must be Unicode, which has no such character"
            )
        if _holds_surrogate(value):
            raise BadRequest(
                f"{_shown(key)} holds a lone surrogate (an escape such as \\ud800 not paired with "
                "another); JSON text must be Unicode, which has no such character",
                param=key,
            )


def _holds_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            for key, inner in item.items():
                if _SURROGATE.search(key):
                    return True
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _shown(text: str) -> str:
    """``text`` (its start) with every character beyond ASCII escaped."""
    return text[:40].encode("ascii", "backslashreplace").decode()
