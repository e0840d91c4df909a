"""The request being served, as routerd's request path sees it: one object per request.

It sits below HTTP (no aiohttp here), so that metrics and the code below the
handlers can leave notes on it without depending on the HTTP layer.

The request middleware (``routerd.api.middleware``) makes a ``RequestContext`` for
each request and makes it current (a context variable) while the handler runs in
the middleware's task. The handler, and the helpers it calls, leave notes on it:

- ``routerd.api.traffic.route_request``: the version routed to (``served``), and
  ``stream_failed`` when a stream already answered 200 ends with an error event;
- ``routerd.api.limits``: the stream slot the request holds, and its stream once
  begun (so a deadline becomes an SSE error event instead of a 504);
- ``routerd.metrics``: usage, the first token's time, a cold start;
- ``routerd.request_log.note_error``: the OpenAI error code of a failure.

Once the response is final, the middleware acts on the notes: per-version
statistics, metrics, the request log's row, the stream slot given back.

One object with slots, rather than a context variable per concern and keys on the
aiohttp request (each a Python-level lookup): every request pays for these, and
on a daemon whose own work per request is tens of microseconds
(``bench/request_path.py``) they were a noticeable share of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar, Token

from state import VersionRecord


class StreamSlots:
    """Streaming responses open now, against ``server.max_streams``."""

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class RequestContext:
    """What the request path learned about one request; see the module docstring."""

    __slots__ = (
        "arrived",
        "cold_start_ms",
        "error",
        "error_message",
        "first_token",
        "served",
        "slots",
        "started",
        "stream",
        "stream_claimed",
        "stream_failed",
        "usage",
    )

    def __init__(self, started: float, slots: StreamSlots) -> None:
        self.started = started  # time.monotonic() when it arrived
        self.arrived = time.time()  # the same moment on the wall clock, for stored records
        self.served: VersionRecord | None = None  # the version routed to, even if it failed
        self.stream_failed = False
        self.slots = slots
        self.stream_claimed = False  # holds one of ``slots``
        # Begun: its status is sent (the HTTP layer's stream response; this module sits
        # below HTTP, so it holds it without knowing its type).
        self.stream: object | None = None
        self.usage: tuple[int, int] | None = None  # (prompt, completion) tokens
        self.first_token: float | None = None
        self.cold_start_ms: float | None = None
        self.error: str | None = None  # the OpenAI error code (else type) it failed with
        self.error_message: str | None = None  # and what the error said

    def release_stream(self) -> None:
        """Give back the stream slot, if the request holds one."""
        if self.stream_claimed:
            self.stream_claimed = False
            self.slots.open -= 1


# The request being served by this task: set by the middleware, read by the notes
# (a handler runs in the middleware's task, so it sees the middleware's value).
_CURRENT: ContextVar[RequestContext | None] = ContextVar("routerd_request", default=None)


# The context variable's own methods, not wrappers: each is called once or more per
# request, and a Python-level wrapper would double what the call costs.
enter: Callable[[RequestContext], Token[RequestContext | None]] = _CURRENT.set
"""Make a context current; give the token to :func:`leave` when the request ends."""
leave: Callable[[Token[RequestContext | None]], None] = _CURRENT.reset
current: Callable[[], RequestContext | None] = _CURRENT.get
"""The request being served, or None outside the request middleware."""
