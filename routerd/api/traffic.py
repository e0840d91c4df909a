"""Client requests meet routes: choose the version, start the shadow copy, measure.

Each OpenAI handler calls ``route_request`` to turn the request's model id into a
version: it picks one by the route's sticky split (key: the ``x-routerd-sticky-key``
header, else the request's ``user`` field, else none: random by weight), starts
the shadow copy in the background if the route mirrors this request, and notes the
version on the request's context (``routerd.request_context``). ``record_served`` then
records, per served version, whether the request failed and how long it took
(streams: until the last byte), which is what rollouts judge and ``routerctl
status`` shows.

A request counts as failed when it ends with a 5xx or an error event inside a
stream. 4xx answers are the client's doing and count as served. A request whose
client went away (499) is not counted at all: it says nothing of the version, and
load generators hang up on every request left at the end of a run.
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web

from routerd.api.keys import ROUTER, SHADOWS
from routerd.request_context import RequestContext, current
from routerd.request_log import CANCELLED_STATUS
from routerd.traffic import ShadowWork
from routerd.version_stats import VersionStats
from state import VersionRecord

STICKY_HEADER: Final = "x-routerd-sticky-key"


def route_request(
    request: web.Request, model_id: str, user: str | None, shadow: ShadowWork
) -> VersionRecord:
    """The version that serves this request; mirrors it to the shadow version if routed so."""
    sticky_key = request.headers.get(STICKY_HEADER) or user or None
    routed = request.app[ROUTER].route(model_id, sticky_key)
    context = current()
    if context is not None:
        context.served = routed.record
    if routed.shadow is not None:
        request.app[SHADOWS].mirror(routed.shadow, shadow)
    return routed.record


def mark_stream_failed() -> None:
    """A stream already answered 200 ended with an error event: count it as failed."""
    context = current()
    if context is not None:
        context.stream_failed = True


def record_served(stats: VersionStats, context: RequestContext, status: int) -> None:
    """Count a finished request for the version that served it (if one was chosen).

    Called by the request middleware (``routerd.api.middleware``) with the final
    status, after errors were turned into responses.
    """
    served = context.served
    if served is not None and status != CANCELLED_STATUS:
        stats.record(
            served.model_id,
            latency_ms=(time.monotonic() - context.started) * 1000,
            ok=status < 500 and not context.stream_failed,
        )
