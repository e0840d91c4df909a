"""Changing where traffic goes: route changes as rolling updates, and shadow copies.

``RouteManager`` is how every route change happens (``routerctl route``, the rollout
controller). A change is a rolling update:

1. every version that gains traffic is loaded and warmed first (through the
   scheduler, the one owner of residency), so no request moves to a cold version;
   if one cannot be loaded the change is refused and nothing moves;
2. the route is stored (with its history row) and the routing table rebuilt and
   swapped whole;
3. versions that lost all their traffic drain (their requests in flight finish) and
   are then evicted, in the background.

``ShadowRunner`` runs the copies of requests that a shadow route mirrors: as
background tasks, never awaited by the primary, their answers discarded and their
failures only counted (per version, as shadow traffic).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from routerd.errors import BadRequest, ModelNotFound, NotFound
from routerd.registry import Registry
from routerd.router import Router
from routerd.scheduler import Scheduler
from routerd.version_stats import SHADOW, VersionStats
from state import RouteRecord, Store, VersionRecord

log = logging.getLogger("routerd.traffic")

ShadowWork = Callable[[VersionRecord], Awaitable[object]]


class RouteManager:
    """Route and shadow changes, each a rolling update (see the module docstring)."""

    def __init__(
        self, store: Store, registry: Registry, router: Router, scheduler: Scheduler
    ) -> None:
        self._store = store
        self._registry = registry
        self._router = router
        self._scheduler = scheduler
        self._tasks: set[asyncio.Task[Any]] = set()

    def record(self, name: str, version: str) -> VersionRecord:
        record = self._router.table.versions.get(f"{name}@{version}")
        if record is None:
            if name not in self._router.table.latest:
                raise ModelNotFound(f"The model '{name}' does not exist", param="model")
            raise ModelNotFound(f"The model '{name}@{version}' does not exist", param="version")
        return record

    def current(self, name: str) -> RouteRecord:
        """``name``'s stored route (404 for an unknown model)."""
        if name not in self._router.table.latest:
            raise ModelNotFound(f"The model '{name}' does not exist", param="model")
        return self._store.route(name)

    async def set_route(
        self,
        name: str,
        weights: Mapping[str, int],
        *,
        reason: str = "manual",
        evict_dropped: bool = True,
        why: str = "route",
    ) -> RouteRecord:
        """Load the versions gaining traffic, swap the route in, drain the ones that lost it.

        ``evict_dropped`` False keeps dropped versions resident (a rollout at 100% keeps
        the old version warm until it promotes, so a rollback is instant).
        """
        before = self.current(name)
        records = {version: self.record(name, version) for version in weights}
        gaining = [
            records[v] for v, w in weights.items() if w > 0 and before.weights.get(v, 0) == 0
        ]
        for record in gaining:
            if self._scheduler.instance(record.model_id) is None:
                log.info("route of %s: loading %s before it gets traffic", name, record.model_id)
            await self._scheduler.load(record, why=why)
        try:
            after = self._store.set_route(name, weights, reason=reason)
        except ValueError as exc:
            raise BadRequest(str(exc), param="weights") from exc
        self._registry.refresh()
        if evict_dropped:
            for version, weight in before.weights.items():
                if weight > 0 and after.weights.get(version, 0) == 0:
                    self.drain_and_evict(self.record(name, version))
        return after

    async def clear_route(self, name: str, *, reason: str = "manual") -> RouteRecord:
        """Serve ``name`` by its newest version again (loaded first, like any change)."""
        before = self.current(name)
        newest = max(
            (r for r in self._router.table.versions.values() if r.name == name),
            key=lambda r: r.created_at,
        )
        await self._scheduler.load(newest, why="route")
        self._store.clear_route(name, reason=reason)
        self._registry.refresh()
        for version, weight in before.weights.items():
            if weight > 0 and version != newest.version:
                self.drain_and_evict(self.record(name, version))
        return self._store.route(name)

    def set_shadow(
        self, name: str, version: str, percent: float, *, reason: str = "manual"
    ) -> RouteRecord:
        """Mirror ``percent`` of ``name``'s requests to ``version`` (loaded on first copy)."""
        self.record(name, version)
        try:
            after = self._store.set_shadow(name, version, percent, reason=reason)
        except ValueError as exc:
            raise BadRequest(str(exc), param="percent") from exc
        self._registry.refresh()
        return after

    def clear_shadow(self, name: str, *, reason: str = "manual") -> RouteRecord:
        self.current(name)
        if not self._store.clear_shadow(name, reason=reason):
            raise NotFound(f"{name} has no shadow", param="model")
        self._registry.refresh()
        return self._store.route(name)

    def drain_and_evict(self, record: VersionRecord) -> None:
        """In the background: let ``record``'s requests finish, then unload it.

        Skipped for a pinned version, or one that has traffic again by then.
        """
        if self._scheduler.is_pinned(record.model_id):
            return
        task = asyncio.create_task(self._evict(record), name=f"retire {record.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _evict(self, record: VersionRecord) -> None:
        route = self._router.table.routes.get(record.name)
        if route is not None and (
            dict(route.weights).get(record.version, 0) > 0
            or (route.shadow is not None and route.shadow[0].model_id == record.model_id)
        ):
            return
        if self._scheduler.instance(record.model_id) is None:
            return
        try:
            await self._scheduler.evict(record.model_id, reason="retired")
        except NotFound:
            pass
        except Exception as exc:
            log.warning("evicting retired %s failed: %s", record.model_id, exc)

    async def wait_idle(self) -> None:
        """Wait for the drains started so far (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


class ShadowRunner:
    """Runs shadow copies in the background; counts their latency and errors per version."""

    def __init__(
        self,
        stats: VersionStats,
        *,
        max_in_flight: int = 64,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._stats = stats
        self._max_in_flight = max_in_flight
        self._timer = timer
        self._tasks: set[asyncio.Task[None]] = set()
        self.dropped: dict[str, int] = {}  # copies skipped because too many were running
        self.closed = False

    def mirror(self, record: VersionRecord, work: ShadowWork) -> None:
        """Start ``work(record)`` in the background, or skip it when too many are running."""
        if self.closed or len(self._tasks) >= self._max_in_flight:
            self.dropped[record.model_id] = self.dropped.get(record.model_id, 0) + 1
            return
        task = asyncio.create_task(self._run(record, work), name=f"shadow {record.model_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: VersionRecord, work: ShadowWork) -> None:
        started = self._timer()
        ok = True
        try:
            await work(record)
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a shadow's failure is measured, never raised
            ok = False
            log.debug("shadow request to %s failed: %s", record.model_id, exc)
        latency_ms = (self._timer() - started) * 1000
        self._stats.record(record.model_id, latency_ms=latency_ms, ok=ok, kind=SHADOW)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
