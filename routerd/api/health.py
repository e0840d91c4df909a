"""Liveness and readiness, for load balancers and systemd.

``/health`` answers as long as the process and its event loop run. ``/ready``
answers 200 only while the store is open, the scheduler runs and shutdown has not
begun, so a balancer stops sending work before the daemon stops taking it.
"""

from __future__ import annotations

from aiohttp import web

from routerd.api.keys import LIVE, SCHEDULER, STORE

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    checks = {
        "store": request.app[STORE].is_open,
        "scheduler": request.app[SCHEDULER].running,
        "accepting": request.app[LIVE].accepting,
    }
    ok = all(checks.values())
    return web.json_response(
        {"status": "ready" if ok else "not ready", "checks": checks}, status=200 if ok else 503
    )
