"""The running daemon's parts, gathered in one place.

The HTTP layer's handlers find each part they use under its own typed app key
(``routerd.api.keys``); they never build or replace a part. The app's start-up
context (``routerd.app``) creates them in order and closes them in reverse.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.registry import BackendRegistry
from routerd.config import Config
from routerd.devices import DeviceInventory
from routerd.memory_audit import MemoryAudit
from routerd.registry import Registry
from routerd.request_log import RequestLog
from routerd.rollout import RolloutController
from routerd.router import Router
from routerd.scheduler import Scheduler
from routerd.traffic import RouteManager, ShadowRunner
from routerd.version_stats import VersionStats
from state import Store


@dataclass
class Live:
    """What changes while the daemon runs: its config (a reload replaces it) and
    whether it still takes requests (shutdown ends that). Read per request."""

    config: Config
    accepting: bool = True  # False once shutdown began: /ready answers 503


@dataclass
class Services:
    """Every part of a running daemon, built once by ``routerd.app``. The app wiring
    and the CLI hold it; HTTP handlers get only their own parts (``routerd.api.keys``)."""

    live: Live
    store: Store
    backends: BackendRegistry
    devices: DeviceInventory
    router: Router
    registry: Registry
    scheduler: Scheduler
    stats: VersionStats  # per-version requests, errors, latency (rollouts, status)
    routes: RouteManager  # route and shadow changes, as rolling updates
    shadows: ShadowRunner  # shadow copies of requests, in the background
    rollouts: RolloutController
    audit: MemoryAudit  # measured memory against the ledger (started with the app)
    request_log: RequestLog  # one row per inference request, written in batches
