"""Answers as bytes: JSON bodies for served requests, and the one server-sent-event
writer every stream uses (chunks, comments, the error event, ``[DONE]``).

A stream whose status is already sent cannot change it any more: an error from then
on goes out as an ``error`` event in the OpenAI shape, followed by ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from routerd.api.errors import as_routerd_error, error_body


def _json_encoder() -> Callable[[Any], str]:
    """``json.dumps`` for answers, made once.

    Answers are built here from plain dicts, lists and scalars, never with a cycle, so
    the encoder need not track every container it enters. And ``JSONEncoder.encode``
    builds its C encoder anew on every call, a third of what encoding a completion
    costs; the json module's C encoder is made once here instead (with the same
    settings as ``json.dumps``), where the interpreter has it.
    """
    fallback = json.JSONEncoder(check_circular=False).encode
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return fallback

    def unserializable(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    encode = make(
        None, unserializable, json.encoder.encode_basestring_ascii, None, ": ", ", ",
        False, False, True,
    )  # fmt: skip
    return lambda payload: "".join(encode(payload, 0))


to_json = _json_encoder()


def answer(payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """A served request's JSON answer, encoded once straight to bytes (``json_response``
    encodes to text, which the response then encodes again, and sets the content type
    through a parser)."""
    headers["Content-Type"] = "application/json"
    return web.Response(body=to_json(payload).encode(), headers=headers)


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
    await response.write(b"data: " + to_json(payload).encode() + b"\n\n")


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
    body = error_body(error.message, type=error.type, param=error.param, code=error.code)
    try:
        await send_event(response, body)
        await end_stream(response)
    except (ConnectionError, RuntimeError):
        pass  # the client is gone
    return response
