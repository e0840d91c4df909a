"""The one middleware every request passes through.

Five concerns wrap each request, each kept in its own module as plain functions:

1. metrics (``routerd.metrics``): begun first and finished last, so they see the
   final status, errors included;
2. per-version traffic statistics (``routerd.api.traffic.record_served``), which
   rollouts judge: recorded from the final response;
3. the OpenAI error shape (``routerd.api.errors.response_for``): whatever a handler
   or the steps below raise becomes a response here;
4. access control (``routerd.api.auth.check_access``): 401/403 before any work;
5. limits (``routerd.api.limits.within_limits``): the request's deadline and the
   cap on open streams, around the handler itself.

They run in that order inside one coroutine rather than as five aiohttp
middlewares: every middleware layer costs each request a coroutine, a frame and a
try block, and on a daemon whose own work per request is a fraction of a
millisecond (``bench/router_overhead.py``) five layers were a fifth of it.

Cancellation (a client gone, a shutdown) and aiohttp's redirects pass through
untouched: there is no response to shape, and metrics count them as they end.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Middleware

from routerd.api.auth import check_access
from routerd.api.errors import Handler, response_for
from routerd.api.limits import within_limits
from routerd.api.traffic import record_served
from routerd.metrics import Metrics


def request_middleware(metrics: Metrics) -> Middleware:
    """The app's only middleware, reporting to ``metrics``."""

    @web.middleware
    async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
        observed = metrics.begin()
        status = 500
        response: web.StreamResponse | None = None
        try:
            try:
                check_access(request)
                response = await within_limits(request, handler)
            except web.HTTPException as exc:
                if exc.status < 400:
                    status = exc.status
                    raise  # a redirect: aiohttp sends it as it is
                response = response_for(exc, request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                response = response_for(exc, request)
            status = response.status
            record_served(request, response, observed.started)
            return response
        finally:
            metrics.finish(request, response, status, observed)

    return serve
