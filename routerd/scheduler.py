"""The scheduler: the one owner of residency (DESIGN.md rule 1).

Only this module creates, loads and removes instances. Request handlers ask for a
lease; operators ask for a load or an eviction; everything else reads snapshots.
All of its state lives on the event loop and is changed only from it, so no lock
is needed: between two ``await`` points nothing else can interleave.

``lease(record)`` — decision tree:

1. The version has a READY instance → lease it at once.
2. A load of that version is in flight → wait for that same load (single flight,
   rule 4): twenty first requests cause exactly one load.
3. The instance is DRAINING or UNLOADING (an eviction is under way) → wait until it
   is gone, then go to 4.
4. Nothing is resident → start one load (placement picks the device), wait for it.
5. The load fails → ``LoadFailed`` (503) with the backend's reason; the failed
   instance is removed and nothing else changes (rule 7).
6. The load outlasts ``load_timeout`` → ``Unavailable`` (503, Retry-After); the load
   itself carries on for whoever asks next.

The lease is released in ``__aexit__`` (rule 3), cancellation included, and an
instance with a live lease is never unloaded: eviction drains first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from backends.base import LoadSpec
from backends.registry import BackendRegistry
from policies.placement import PlacementError, place
from routerd.devices import DeviceInventory, DeviceReading
from routerd.errors import Draining, LoadFailed, NotFound, Unavailable
from routerd.instance import Instance, InstanceSnapshot, InstanceState
from state import VersionRecord

log = logging.getLogger("routerd.scheduler")


class EventLog(Protocol):
    """Where the scheduler records what it committed (the store's event table)."""

    def __call__(
        self,
        kind: str,
        model: str,
        version: str,
        *,
        device: str | None = None,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> object: ...


@dataclass(frozen=True)
class Lease:
    """A request's hold on a ready instance; valid inside ``async with`` only."""

    instance: Instance
    cold_start_ms: float | None  # set when this request waited for a load


@dataclass(frozen=True)
class DeviceSnapshot:
    id: str
    kind: str
    name: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    reserved_bytes: int
    routerd_bytes: int


def estimate_weights_bytes(path: str) -> int:
    """Bytes of the checkpoint's safetensors files: the weights' floor in memory."""
    folder = Path(path)
    try:
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    except OSError:
        return 0


class Scheduler:
    """Owns every instance; see the module docstring for how a lease is served."""

    def __init__(
        self,
        backends: BackendRegistry,
        devices: DeviceInventory,
        events: EventLog,
        *,
        load_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._devices = devices
        self._events = events
        self._load_timeout = load_timeout
        self._clock = clock
        self._instances: dict[str, Instance] = {}
        self._loads: dict[str, asyncio.Task[Instance]] = {}
        self._closing = False
        self.load_count = 0

    # -- requests ---------------------------------------------------------------

    @asynccontextmanager
    async def lease(self, record: VersionRecord) -> AsyncIterator[Lease]:
        """Hold a READY instance of ``record`` for the whole ``async with`` body."""
        started = self._clock()
        instance, waited = await self._ready_instance(record)
        instance.acquire()
        cold_start_ms = (self._clock() - started) * 1000 if waited else None
        try:
            yield Lease(instance=instance, cold_start_ms=cold_start_ms)
        finally:
            instance.release()

    async def _ready_instance(self, record: VersionRecord) -> tuple[Instance, bool]:
        waited = False
        while True:
            if self._closing:
                raise Draining("routerd is shutting down", retry_after=5)
            instance = self._instances.get(record.model_id)
            if instance is not None and instance.state is InstanceState.READY:
                return instance, waited
            waited = True
            if instance is not None and instance.state in (
                InstanceState.DRAINING,
                InstanceState.UNLOADING,
            ):
                await instance.gone.wait()
                continue
            await self._await_load(record)

    async def _await_load(self, record: VersionRecord) -> Instance:
        task = self._loads.get(record.model_id)
        if task is None:
            task = asyncio.create_task(self._load(record), name=f"load {record.model_id}")
            self._loads[record.model_id] = task
            task.add_done_callback(self._load_done)
        try:
            # shield: a waiter that gives up (timeout, client gone) must not cancel
            # the load the other waiters share.
            return await asyncio.wait_for(asyncio.shield(task), self._load_timeout)
        except TimeoutError:
            raise Unavailable(
                f"{record.model_id} is still loading after {self._load_timeout:.0f}s",
                retry_after=5,
            ) from None

    def _load_done(self, task: asyncio.Task[Instance]) -> None:
        for key, known in list(self._loads.items()):
            if known is task:
                del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters that gave up must not leave it unseen

    # -- operators --------------------------------------------------------------

    async def load(self, record: VersionRecord) -> InstanceSnapshot:
        """Make ``record`` resident (or return the resident instance)."""
        instance, _ = await self._ready_instance(record)
        return InstanceSnapshot.of(instance)

    async def evict(self, model_id: str, *, reason: str) -> InstanceSnapshot:
        """Drain (no new leases; live ones finish), then unload ``model_id``."""
        instance = self._instances.get(model_id)
        if instance is None:
            raise NotFound(f"{model_id} is not loaded", param="model")
        if instance.state in (InstanceState.LOADING, InstanceState.WARMING):
            task = self._loads.get(model_id)
            if task is not None:
                await asyncio.wait([task])
            return await self.evict(model_id, reason=reason)
        if instance.state is not InstanceState.READY:
            await instance.gone.wait()
            return InstanceSnapshot.of(instance)
        instance.state = InstanceState.DRAINING
        await instance.idle.wait()
        snapshot = InstanceSnapshot.of(instance)
        await self._unload(instance)
        self._events(
            "evict",
            instance.record.name,
            instance.record.version,
            device=instance.device,
            reason=reason,
            detail={"bytes": snapshot.bytes},
        )
        log.info("evicted %s from %s (%s)", model_id, instance.device, reason)
        return snapshot

    async def close(self) -> None:
        """Stop for shutdown: refuse new leases, wait for loads, unload everything.

        The HTTP server has already waited for in-flight requests by the time this
        runs, so the drain here is normally instant.
        """
        self._closing = True
        if self._loads:
            await asyncio.wait(list(self._loads.values()))
        for model_id in list(self._instances):
            try:
                await self.evict(model_id, reason="shutdown")
            except Exception:  # one bad unload must not keep the others resident
                log.exception("unloading %s at shutdown failed", model_id)

    # -- snapshots --------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not self._closing

    def instances(self) -> list[InstanceSnapshot]:
        return [InstanceSnapshot.of(i) for i in self._instances.values()]

    def instance(self, model_id: str) -> InstanceSnapshot | None:
        found = self._instances.get(model_id)
        return None if found is None else InstanceSnapshot.of(found)

    def devices(self) -> list[DeviceSnapshot]:
        def ours(reading: DeviceReading, *, loading: bool) -> int:
            return sum(
                (i.estimated_bytes if loading else i.bytes)
                for i in self._instances.values()
                if i.device == reading.id
                and (i.state in (InstanceState.LOADING, InstanceState.WARMING)) == loading
            )

        return [
            DeviceSnapshot(
                id=r.id,
                kind=r.kind,
                name=r.name,
                total_bytes=r.total_bytes,
                used_bytes=r.used_bytes,
                free_bytes=r.free_bytes,
                reserved_bytes=ours(r, loading=True),
                routerd_bytes=ours(r, loading=False),
            )
            for r in self._devices.readings()
        ]

    # -- effects ----------------------------------------------------------------

    async def _load(self, record: VersionRecord) -> Instance:
        """Load, warm up and measure one instance; on failure leave nothing behind."""
        try:
            device = place(str(record.options.get("device", "auto")), self._devices.device_ids())
            backend = self._backends.get(record.backend)
        except (PlacementError, ValueError) as exc:
            self._events("load_failed", record.name, record.version, reason=str(exc))
            raise LoadFailed(f"cannot load {record.model_id}: {exc}") from exc
        instance = Instance(record, device, estimated_bytes=estimate_weights_bytes(record.path))
        self._instances[record.model_id] = instance
        self.load_count += 1
        backend_options = {k: v for k, v in record.options.items() if k != "device"}
        spec = LoadSpec(
            name=record.name,
            version=record.version,
            path=record.path,
            options=backend_options,
            device=device,
        )
        log.info("loading %s on %s", record.model_id, device)
        try:
            model = await instance.run(backend.load, spec)
            instance.attach(model)
            instance.state = InstanceState.WARMING
            await instance.run(model.warm_up)
            instance.bytes = await instance.run(model.footprint_bytes)
        except BaseException as exc:
            await self._unload(instance)
            reason = str(exc) or type(exc).__name__
            self._events("load_failed", record.name, record.version, device=device, reason=reason)
            log.warning("loading %s on %s failed: %s", record.model_id, device, reason)
            if isinstance(exc, Exception):
                raise LoadFailed(f"loading {record.model_id} failed: {reason}") from exc
            raise
        instance.load_ms = (time.monotonic() - instance.load_started) * 1000
        instance.state = InstanceState.READY
        self._events(
            "load",
            record.name,
            record.version,
            device=device,
            reason="request",
            detail={"bytes": instance.bytes, "load_ms": round(instance.load_ms, 1)},
        )
        log.info(
            "loaded %s on %s: %d bytes in %.0f ms",
            record.model_id,
            device,
            instance.bytes,
            instance.load_ms,
        )
        return instance

    async def _unload(self, instance: Instance) -> None:
        instance.state = InstanceState.UNLOADING
        model = instance.detach()
        try:
            if model is not None:
                await instance.run(model.unload)
        finally:
            instance.close_executor()
            if self._instances.get(instance.model_id) is instance:
                del self._instances[instance.model_id]
            instance.gone.set()
