"""``GET /metrics``: the Prometheus text exposition of ``routerd.metrics``.

The metrics themselves sit below HTTP; this is the one place that serves them.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from routerd.api.keys import AUDIT, SCHEDULER
from routerd.metrics import Metrics

METRICS: Final = web.AppKey("metrics", Metrics)

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of this daemon's metrics."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application) -> Metrics:
    """Create the app's metrics, observe its scheduler, serve ``/metrics``; the app's
    builder hands them to the request middleware (``routerd.api.middleware``)."""
    found = Metrics()
    found.attach(app[SCHEDULER])
    found.watch_audit(app[AUDIT])
    app[METRICS] = found
    app.add_routes(routes)
    return found
