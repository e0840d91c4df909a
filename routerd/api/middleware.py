"""The one middleware every request passes through.

Six concerns wrap each request, each kept in its own module as plain functions:

1. metrics (``routerd.metrics``): finished last, so they see the final status,
   errors included;
2. the request log (``routerd.request_log``): one row per request to the OpenAI
   inference endpoints, from the same final status, buffered after the metrics;
3. per-version traffic statistics (``routerd.api.traffic.record_served``), which
   rollouts judge: recorded from the final response;
4. the OpenAI error shape (``routerd.api.errors.response_for``): whatever a handler
   or the steps below raise becomes a response here;
5. access control (``routerd.api.auth.check_access``): 401/403 before any work;
6. limits (``routerd.api.limits.within_limits``): the request's deadline and the
   cap on open streams, around the handler itself.

What the handler learns about the request (the version it was routed to, its
usage, its stream slot) lives on one ``RequestContext`` (``routerd.request_context``),
made here and current while the handler runs.

They run in that order inside one coroutine rather than as six aiohttp
middlewares: every middleware layer costs each request a coroutine, a frame and a
try block, and on a daemon whose own work per request is a fraction of a
millisecond (``bench/router_overhead.py``) five layers were a fifth of it.

Cancellation (a client gone, a shutdown) and aiohttp's redirects pass through
untouched: there is no response to shape. A request whose client left — cancelled,
or gone while its stream was written — ends as 499 ``cancelled`` for the metrics,
the log line (at info) and the request log, and is left out of what rollouts judge.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from routerd.api.auth import check_access
from routerd.api.errors import Handler, response_for
from routerd.api.limits import Deadlines, within_limits
from routerd.api.traffic import record_served
from routerd.metrics import Metrics
from routerd.request_context import RequestContext, StreamSlots, enter, leave
from routerd.request_log import CANCELLED, CANCELLED_STATUS, RequestLog, note_client_gone
from routerd.services import Live
from routerd.version_stats import VersionStats


def request_middleware(
    live: Live,
    stats: VersionStats,
    metrics: Metrics,
    deadlines: Deadlines,
    slots: StreamSlots,
    requests: RequestLog,
) -> Middleware:
    """The app's only middleware: limits and access from ``live``'s config (a reload
    replaces it), served requests counted in ``stats`` and reported to ``metrics``;
    request deadlines watched by ``deadlines``; streams counted in ``slots``; inference
    requests recorded in ``requests`` (while its config has it on)."""

    @web.middleware
    async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
        context = RequestContext(time.monotonic(), slots)
        token = enter(context)
        status = 500
        try:
            server = live.config.server  # read per request: a reload replaces it
            try:
                check_access(request, server)
                response = await within_limits(
                    request, handler, context, timeout=server.request_timeout, deadlines=deadlines
                )
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise  # a redirect: aiohttp sends it as it is
                response = response_for(exc, request)
            except asyncio.CancelledError:
                note_client_gone()
                status = CANCELLED_STATUS
                raise
            except Exception as exc:
                response = response_for(exc, request)
            status = CANCELLED_STATUS if context.error == CANCELLED else response.status
            record_served(stats, context, status)
            return response
        finally:
            leave(token)
            route = request.match_info.route.resource
            endpoint = route.canonical if route is not None else "unmatched"
            metrics.finish(endpoint, status, context, method=request.method, path=request.path)
            if endpoint in requests.endpoints:
                requests.add(context, endpoint, status)

    return serve
