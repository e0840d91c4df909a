"""Wiring: build every part from a Config, attach the HTTP routes, own the lifecycle.

Start-up order: open the store (migrations run), sync config (and demo) models into
the registry, build router and scheduler, then the traffic parts (per-version stats,
route manager, shadow runner, rollout controller, which resumes running rollouts),
the memory audit and the request log. When the app starts, the backends in use are
prepared and the audit reads its baseline before the scheduler loads anything
(pinned versions); the request log's flusher starts. Shutdown runs in reverse:
aiohttp stops accepting and lets in-flight requests finish
(``server.shutdown_timeout``), then the cleanup context stops the audit, the rollout
controller and the shadow copies, unloads every instance, writes the request log's
last rows and closes the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from backends.base import LoadSpec
from backends.registry import BackendRegistry
from policies import registry as policy_registry
from routerd.api import admin, health, keys, openai, openapi, prometheus, traffic_admin
from routerd.api.keys import SERVICES
from routerd.api.limits import DEADLINES, STREAM_SLOTS, Deadlines
from routerd.api.middleware import request_middleware
from routerd.clock import Clock, LoopClock
from routerd.config import Config
from routerd.devices import DeviceInventory, NvmlProbe, cpu_budget_beside_tier
from routerd.memory_audit import AuditSettings, MemoryAudit, MemoryReader
from routerd.model_ids import split_model_id
from routerd.process_memory import ProcessMemoryReader
from routerd.registry import Registry
from routerd.request_context import StreamSlots
from routerd.request_log import RequestLog
from routerd.rollout import RolloutController
from routerd.router import Router
from routerd.scheduler import Scheduler, SchedulerSettings
from routerd.services import Live, Services
from routerd.traffic import RouteManager, ShadowRunner
from routerd.version_options import SCHEDULER_OPTIONS
from routerd.version_stats import VersionStats
from state import Store, VersionRecord, VersionSpec

log = logging.getLogger("routerd")


def build_services(
    config: Config,
    *,
    backends: BackendRegistry | None = None,
    devices: DeviceInventory | None = None,
    clock: Clock | None = None,
    on_change: Callable[[Scheduler], None] | None = None,
    wall_clock: Callable[[], float] = time.time,
    memory_reader: MemoryReader | None = None,
    audit_clock: Clock | None = None,
    request_log_clock: Clock | None = None,
) -> Services:
    """Open the store and build every part; the store is closed again on failure.

    ``clock`` drives the scheduler: its reads and every wait (real time when None).
    ``wall_clock`` drives the per-version statistics and rollout steps, whose times
    are stored and outlive the process. ``memory_reader`` and ``audit_clock`` are the
    memory audit's (this process's /proc and NVML, and real time, when None): the
    audit samples on a clock of its own so that it never adds a timer to the
    scheduler's, which virtual-time tests count; so does the request log's flusher
    (``request_log_clock``, real time when None).
    """
    store = Store.open(config.database_path, busy_timeout=config.busy_timeout)
    try:
        backends = backends or BackendRegistry()
        devices = devices or DeviceInventory(
            NvmlProbe.open(),
            cpu_budget=cpu_budget_beside_tier(config.devices.cpu_memory, config.devices.host_cache),
            gpu_indices=config.devices.gpus,
        )
        placement = policy_registry.create(
            "placement",
            config.scheduler.placement,
            eviction=policy_registry.create("eviction", config.scheduler.eviction),
        )
        router = Router()
        registry = Registry(store, backends, router, model_roots=config.allowed_model_roots)
        synced = registry.sync(config.models, source="config")
        registry.sync(_demo_specs(config), source="demo")
        if synced.added or synced.updated or synced.removed:
            log.info(
                "config models synced: added=%s updated=%s removed=%s",
                synced.added,
                synced.updated,
                synced.removed,
            )
        for model_id in sorted(config.pinned):
            name, version = split_model_id(model_id)
            if version is None:  # Config.pinned holds the name@version of pinned specs
                raise ValueError(f"pinned model {model_id!r} names no version")
            store.set_pinned(name, version, True)
        scheduler = Scheduler(
            backends,
            devices,
            store,
            placement,
            SchedulerSettings.from_config(config.scheduler, config.devices),
            clock=clock,
            on_change=on_change,
        )
        stats = VersionStats(wall_clock)
        routes = RouteManager(store, registry, router, scheduler)
        rollouts = RolloutController(store, router, routes, scheduler, stats, clock=wall_clock)
        audit = MemoryAudit(
            scheduler,
            memory_reader or ProcessMemoryReader(devices),
            AuditSettings.from_config(config.memory_audit, os.environ),
            clock=audit_clock or LoopClock(),
            wall=wall_clock,
        )
        request_log = RequestLog(store, config.request_log, clock=request_log_clock or LoopClock())
    except BaseException:
        store.close()
        raise
    return Services(
        live=Live(config),
        store=store,
        backends=backends,
        devices=devices,
        router=router,
        registry=registry,
        scheduler=scheduler,
        stats=stats,
        routes=routes,
        shadows=ShadowRunner(stats),
        rollouts=rollouts,
        audit=audit,
        request_log=request_log,
    )


def _demo_specs(config: Config) -> list[VersionSpec]:
    """The demo models, built once under the state dir, when ``--demo`` asks for them."""
    if not config.demo:
        return []
    from routerd.demo import ensure_demo_models

    return [
        VersionSpec(
            name=m.name, version=m.version, backend=m.backend, path=m.path, options=m.options
        )
        for m in ensure_demo_models(config.demo_dir)
    ]


def build_app(services: Services) -> web.Application:
    app = web.Application(client_max_size=services.live.config.server.max_body_bytes)
    keys.install(app, services)
    slots = app[STREAM_SLOTS] = StreamSlots(limit=services.live.config.server.max_streams)
    deadlines = app[DEADLINES] = Deadlines()
    app.add_routes(openai.routes)
    app.add_routes(admin.routes)
    app.add_routes(traffic_admin.routes)
    app.add_routes(health.routes)
    app.middlewares.append(
        request_middleware(
            services.live,
            services.stats,
            prometheus.install(app),
            deadlines,
            slots,
            services.request_log,
        )
    )
    app.add_routes(openapi.routes)
    app.on_shutdown.append(_stop_accepting)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _prepare_runtimes(services: Services) -> None:
    """Bring every registered version's runtime into the process before the memory
    audit reads its baseline: what a backend imports (torch, some 200 MB) and what its
    runtime loads on first use (transformers' tokenizer stack, some 80 MB, on the first
    estimate) belong to the daemon, not to any model, and would otherwise read as use
    beyond the ledger from the first load on. So each backend in use is created and
    estimates one of its versions (checkpoint headers only; nothing is loaded)."""
    first: dict[str, VersionRecord] = {}
    for record in services.registry.versions():
        first.setdefault(record.backend, record)
    devices = services.devices.device_ids()
    for kind, record in sorted(first.items()):
        spec = LoadSpec(
            name=record.name,
            version=record.version,
            path=record.path,
            options={k: v for k, v in record.options.items() if k not in SCHEDULER_OPTIONS},
            device=devices[0] if devices else "cpu",
        )
        try:
            backend = services.backends.get(kind)
            await asyncio.to_thread(backend.estimate_footprint, spec)
        except Exception as exc:  # a missing extra or folder: its load will say so
            log.info("backend %s not prepared at start: %s", kind, exc)


async def _stop_accepting(app: web.Application) -> None:
    app[SERVICES].live.accepting = False
    log.info("shutting down: no new requests, waiting for in-flight ones")


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    if services.audit.settings.enabled:
        await _prepare_runtimes(services)
        services.audit.start()  # the baseline: before the scheduler loads pinned models
    await services.scheduler.start(services.router.table.versions.get)
    services.rollouts.start()
    services.request_log.start()
    yield
    services.live.accepting = False
    try:
        await services.audit.close()
        await services.rollouts.close()
        await services.shadows.close()
        await services.routes.close()
        await services.scheduler.close()
    finally:
        app[DEADLINES].close()
        await services.request_log.close()  # never raises
        services.store.close()
        log.info("stopped")
