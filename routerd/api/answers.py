"""Answers as bytes: JSON bodies for served requests, and the one server-sent-event
writer every stream uses (chunks, comments, the error event, ``[DONE]``).

A stream whose status is already sent cannot change it any more: an error from then
on goes out as an ``error`` event in the OpenAI shape, followed by ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from routerd.api.errors import as_routerd_error, error_body
from routerd.request_log import note_error

to_json: Callable[[Any], bytes] = orjson.dumps
"""Answers and stream chunks as compact UTF-8 JSON bytes, ready to send.

Encoding is a good part of what a served request costs routerd, and orjson does it
in one C call straight to bytes, where ``json.dumps`` builds an encoder per call and
returns text that must then be encoded again. What it refuses is a TypeError
(``orjson.JSONEncodeError``): a type it does not know (a set, say), a key that is not
a string, text with a lone surrogate. NaN and infinities come out as ``null``, so an
answer that could carry them checks its floats first (``routerd.api.openai._encode``).
"""


def answer(payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """A served request's JSON answer, encoded once straight to bytes (``json_response``
    encodes to text, which the response then encodes again, and sets the content type
    through a parser)."""
    headers["Content-Type"] = "application/json"
    return web.Response(body=to_json(payload), headers=headers)


# -- server-sent events ------------------------------------------------------------

DONE = b"data: [DONE]\n\n"


async def open_stream(request: web.Request, headers: Mapping[str, str]) -> web.StreamResponse:
    """Send a stream's status and headers; events follow."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + to_json(payload) + b"\n\n")


async def send_comment(response: web.StreamResponse, text: str) -> None:
    """A comment line, which SSE clients ignore: keeps a silent connection alive."""
    await response.write(f": {text}\n\n".encode())


async def end_stream(response: web.StreamResponse) -> None:
    await response.write(DONE)
    await response.write_eof()


async def fail_stream(response: web.StreamResponse, exc: BaseException) -> web.StreamResponse:
    """End a stream already begun with ``exc`` as an error event, then ``[DONE]``.

    A client that left meanwhile is no error of ours: nothing more is written.
    """
    error = as_routerd_error(exc)
    note_error(error.code or error.type, error.message)
    body = error_body(error.message, type=error.type, param=error.param, code=error.code)
    try:
        await send_event(response, body)
        await end_stream(response)
    except (ConnectionError, RuntimeError):
        pass  # the client is gone
    return response
