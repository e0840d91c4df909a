"""The typed keys under which handlers find the daemon's parts on their app.

Each handler reads the parts it uses (``request.app[SCHEDULER]``), not the whole of
``routerd.services.Services``: what a module depends on is then visible in its
imports. ``SERVICES`` itself is for the app's own start-up and shutdown (and tests).
"""

from __future__ import annotations

from aiohttp import web

from routerd.devices import DeviceInventory
from routerd.memory_audit import MemoryAudit
from routerd.registry import Registry
from routerd.request_log import RequestLog
from routerd.rollout import RolloutController
from routerd.router import Router
from routerd.scheduler import Scheduler
from routerd.services import Live, Services
from routerd.traffic import RouteManager, ShadowRunner
from routerd.version_stats import VersionStats
from state import Store

SERVICES = web.AppKey("services", Services)
"""All of the daemon's parts, for the app's lifecycle; handlers use the keys below."""

LIVE = web.AppKey("live", Live)
STORE = web.AppKey("store", Store)
DEVICES = web.AppKey("devices", DeviceInventory)
ROUTER = web.AppKey("router", Router)
REGISTRY = web.AppKey("registry", Registry)
SCHEDULER = web.AppKey("scheduler", Scheduler)
STATS = web.AppKey("stats", VersionStats)
ROUTES = web.AppKey("routes", RouteManager)
SHADOWS = web.AppKey("shadows", ShadowRunner)
ROLLOUTS = web.AppKey("rollouts", RolloutController)
AUDIT = web.AppKey("audit", MemoryAudit)
REQUEST_LOG = web.AppKey("request_log", RequestLog)


def install(app: web.Application, services: Services) -> None:
    """Put ``services`` and each of its parts on ``app`` under their keys."""
    app[SERVICES] = services
    app[LIVE] = services.live
    app[STORE] = services.store
    app[DEVICES] = services.devices
    app[ROUTER] = services.router
    app[REGISTRY] = services.registry
    app[SCHEDULER] = services.scheduler
    app[STATS] = services.stats
    app[ROUTES] = services.routes
    app[SHADOWS] = services.shadows
    app[ROLLOUTS] = services.rollouts
    app[AUDIT] = services.audit
    app[REQUEST_LOG] = services.request_log
