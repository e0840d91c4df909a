"""Per-request limits of the OpenAI API: a deadline and a cap on open streams.

- **Deadline** (``server.request_timeout``): a request still unanswered when it runs
  out gets 504 — or, when its stream has already begun, an ``error`` event and
  ``[DONE]``. Running out cancels the handler, and cancellation reaches the work: a
  generation's row is told to stop and is awaited before the lease is released
  (``routerd.api.generation``), so the model's thread is never left computing for a
  client that has been answered.
- **Streams** (``server.max_streams``): a streaming request over the cap gets 429 with
  Retry-After before it takes a lease, so slow readers cannot hold every instance.

The limits of one request live in a context variable set by the middleware: the
handler runs in the same task, and nothing has to be stored on the request.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from dataclasses import dataclass, field

from aiohttp import web

from routerd.api.errors import Handler, error_body
from routerd.errors import GatewayTimeout, TooManyStreams
from routerd.services import SERVICES


@dataclass
class StreamSlots:
    """Streaming responses open now, against ``server.max_streams``."""

    limit: int
    open: int = 0


STREAM_SLOTS = web.AppKey("stream_slots", StreamSlots)


@dataclass
class _RequestLimits:
    slots: StreamSlots
    claimed: bool = False
    stream: web.StreamResponse | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.claimed:
            self.claimed = False
            self.slots.open -= 1


_CURRENT: contextvars.ContextVar[_RequestLimits | None] = contextvars.ContextVar(
    "routerd_request_limits", default=None
)


def claim_stream() -> None:
    """Take a stream slot for the current request, or raise 429 if none is free."""
    limits = _CURRENT.get()
    if limits is None or limits.claimed:
        return
    if limits.slots.open >= limits.slots.limit:
        raise TooManyStreams(
            f"{limits.slots.limit} streams are open, the most routerd serves at once; "
            "retry shortly",
            retry_after=1,
        )
    limits.slots.open += 1
    limits.claimed = True


def streaming(response: web.StreamResponse) -> None:
    """Note that the current request's stream has begun (its status is sent)."""
    limits = _CURRENT.get()
    if limits is not None:
        limits.stream = response


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != "POST" or not request.path.startswith("/v1/"):
        return await handler(request)
    server = request.app[SERVICES].config.server
    limits = _RequestLimits(request.app[STREAM_SLOTS])
    token = _CURRENT.set(limits)
    try:
        async with asyncio.timeout(server.request_timeout) as deadline:
            return await handler(request)
    except TimeoutError:
        if not deadline.expired():
            raise  # the handler's own timeout, not the request's deadline
        message = f"the request did not finish within {server.request_timeout:g}s"
        if limits.stream is None:
            raise GatewayTimeout(message) from None
        return await _end_stream(limits.stream, message)
    finally:
        limits.release()
        _CURRENT.reset(token)


async def _end_stream(response: web.StreamResponse, message: str) -> web.StreamResponse:
    """A stream past its deadline: say so in the stream, then end it."""
    error = GatewayTimeout(message)
    payload = error_body(error.message, type=error.type, code=error.code)
    try:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionError, RuntimeError):
        pass  # the client is gone too
    return response
