"""Residency state and its upkeep: what the scheduler owns, and how instances leave.

``ResidencyCore`` holds the scheduler's state (instances, pins, leaks, loads in
flight) and everything that does not decide what loads where: snapshots and the
memory ledger, eviction (drain, unload, verify the memory came back), the
keep-alive reaper and device polling. ``routerd.scheduler.Scheduler`` builds on it
with leases, loading and placement. Both run only on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from backends.base import Sleepable
from backends.registry import BackendRegistry
from policies.placement import PlacementPolicy
from policies.types import DeviceRoom, Resident
from routerd import proctree
from routerd.config import DevicesConfig, SchedulerConfig
from routerd.devices import DeviceInventory, DeviceReading
from routerd.instance import Instance, InstanceSnapshot, InstanceState
from routerd.memory import Holding, LedgerRow, build_ledger
from state import StoreError, VersionRecord

log = logging.getLogger("routerd.scheduler")


class ResidencyStore(Protocol):
    """What the scheduler keeps in SQLite: events, pins, measured footprints."""

    def record_event(
        self,
        kind: str,
        model: str,
        version: str,
        *,
        device: str | None = None,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
        bytes: int | None = None,
        duration_ms: float | None = None,
        trigger: str | None = None,
    ) -> object: ...

    def pinned_versions(self) -> list[tuple[str, str]]: ...

    def set_pinned(self, name: str, version: str, pinned: bool) -> None: ...

    def measured_footprint(self, name: str, version: str, device_kind: str) -> Any: ...

    def record_footprint(
        self,
        name: str,
        version: str,
        device_kind: str,
        *,
        measured: Mapping[str, int],
        estimated_bytes: int | None,
    ) -> None: ...


class SchedulerObserver(Protocol):
    """Watches the scheduler from outside (metrics): its event log and its batches."""

    def event(self, kind: str, record: VersionRecord, fields: Mapping[str, Any]) -> None: ...

    def batch(self, record: VersionRecord, rows: int) -> None: ...


@dataclass(frozen=True)
class SchedulerSettings:
    load_timeout: float = 600.0
    load_wait_timeout: float = 30.0
    min_residency: float = 10.0
    keep_alive: float = 300.0
    release_timeout: float = 10.0
    scale_down_idle: float = 30.0  # extra replicas leave after this long idle
    routing: str = "least-outstanding"
    max_queue: int = 256  # requests waiting per version before 429; 0 = no limit
    max_failures: int = 3  # backend failures in a row before an instance is failed
    stop_timeout: float = 30.0  # cancelled work must stop this soon, or the instance is hung
    poll_interval: float = 2.0
    headroom: Mapping[str, int] = field(default_factory=dict)  # by device kind

    @classmethod
    def from_config(cls, scheduler: SchedulerConfig, devices: DevicesConfig) -> SchedulerSettings:
        return cls(
            load_timeout=scheduler.load_timeout,
            load_wait_timeout=scheduler.load_wait_timeout,
            min_residency=scheduler.min_residency,
            keep_alive=scheduler.keep_alive,
            release_timeout=scheduler.release_timeout,
            routing=scheduler.routing,
            max_queue=scheduler.max_queue,
            max_failures=scheduler.max_failures,
            stop_timeout=scheduler.stop_timeout,
            poll_interval=devices.poll_interval,
            headroom={"cuda": devices.gpu_headroom, "cpu": devices.cpu_headroom},
        )


@dataclass(slots=True)
class Lease:
    """A request's hold on a ready instance; valid inside ``async with`` only.

    Not frozen, though never changed: one is built per request, and a frozen
    dataclass costs about four times as much to build."""

    instance: Instance
    cold_start_ms: float | None  # set when this request waited for a load


@dataclass(frozen=True)
class Leak:
    """An evicted instance whose memory NVML never showed back; its bytes stay counted."""

    model_id: str
    device: str
    bytes: int


@dataclass(frozen=True)
class Failure:
    """The latest failure of a version's instance, for status pages."""

    model: str
    version: str
    device: str
    reason: str
    at: float  # wall clock
    times: int  # instances of this version failed since routerd started


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
    budget_bytes: int
    foreign_bytes: int
    headroom_bytes: int
    capacity_bytes: int
    free_for_planning_bytes: int
    over_budget_bytes: int  # used (ours + loads allocating) beyond capacity; should stay 0


class ResidencyCore:
    """The scheduler's state and upkeep; see the module docstring."""

    def __init__(
        self,
        backends: BackendRegistry,
        devices: DeviceInventory,
        store: ResidencyStore,
        placement: PlacementPolicy,
        settings: SchedulerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        our_pid: int | None = None,
        on_change: Callable[[ResidencyCore], None] | None = None,
    ) -> None:
        self._backends = backends
        self._devices = devices
        self._store = store
        self._placement = placement
        self.settings = settings or SchedulerSettings()
        self._clock = clock
        self._on_change = on_change  # e.g. metrics, or a test asserting the ledger
        self.observer: SchedulerObserver | None = None  # sees events and batches (metrics)
        self._pid = os.getpid() if our_pid is None else our_pid
        self._instances: dict[str, Instance] = {}
        self._loads: dict[str, asyncio.Task[Instance]] = {}
        self._waiting: dict[str, int] = {}  # model id → requests waiting for it
        self._service_s: dict[str, float] = {}  # model id → moving average of lease time
        self._load_s: dict[str, float] = {}  # model id → how long its last load took
        self._routing_policies: dict[str, Any] = {}  # by name; some keep counters
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pinned: set[str] = {f"{n}@{v}" for n, v in store.pinned_versions()}
        self._leaks: list[Leak] = []
        self._retiring: list[Instance] = []  # failed, no longer routed to, not yet unloaded
        self._failures: dict[str, Failure] = {}  # by model id
        self._unrecorded: list[tuple[str, VersionRecord, dict[str, Any]]] = []
        self._change_waiters: list[asyncio.Future[None]] = []
        self._reaper_waiters: list[asyncio.Future[None]] = []
        self._reaper_looks_at = math.inf  # scheduler clock: the reaper's next own look
        self._closing = False
        self._background: list[asyncio.Task[None]] = []

    # -- snapshots --------------------------------------------------------------

    def _snapshot(self, instance: Instance) -> InstanceSnapshot:
        return InstanceSnapshot.of(
            instance, pinned=instance.model_id in self._pinned, now=self._clock()
        )

    def instances(self) -> list[InstanceSnapshot]:
        return [self._snapshot(i) for i in self._instances.values()]

    def instance(self, model_id: str) -> InstanceSnapshot | None:
        """The version's first replica (or an instance key's own snapshot), if resident."""
        found = self._instances.get(model_id)
        if found is None:
            replicas = [i for i in self._instances.values() if i.record.model_id == model_id]
            found = min(replicas, key=lambda i: i.replica) if replicas else None
        return None if found is None else self._snapshot(found)

    def leaks(self) -> list[Leak]:
        return list(self._leaks)

    def failures(self) -> list[Failure]:
        """The latest failure of every version that had one, newest first."""
        return sorted(self._failures.values(), key=lambda f: f.at, reverse=True)

    def is_pinned(self, model_id: str) -> bool:
        return model_id in self._pinned

    def ledger(self, *, fresh: bool = True) -> list[LedgerRow]:
        """The memory ledger now (``fresh``: read NVML and the kernel first)."""
        readings = self._devices.readings() if fresh else self._devices.last_readings()
        return build_ledger(
            readings,
            self._holdings(),
            headroom=self.settings.headroom,
            our_pid=self._pid,
            our_children=self._children(readings),
        )

    def _children(self, readings: Sequence[DeviceReading]) -> set[int]:
        """Our child processes, looked up only when a GPU reports per-process bytes."""
        if self._pid != os.getpid() or not any(r.process_bytes for r in readings):
            return set()
        return proctree.descendants(self._pid)

    def devices(self) -> list[DeviceSnapshot]:
        names = {r.id: r for r in self._devices.last_readings()}
        return [
            DeviceSnapshot(
                id=row.device,
                kind=row.kind,
                name=names[row.device].name if row.device in names else row.device,
                total_bytes=names[row.device].total_bytes if row.device in names else row.budget,
                used_bytes=row.measured_used,
                free_bytes=row.measured_free,
                reserved_bytes=row.reserved + row.claimed,
                routerd_bytes=row.ours,
                budget_bytes=row.budget,
                foreign_bytes=row.foreign,
                headroom_bytes=row.headroom,
                capacity_bytes=row.capacity,
                free_for_planning_bytes=row.free,
                over_budget_bytes=row.over_budget,
            )
            for row in self.ledger(fresh=False)
        ]

    def _holdings(self) -> list[Holding]:
        holdings = [Holding(leak.device, leak.bytes, "resident") for leak in self._leaks]
        holdings += [Holding(i.device, i.bytes, "victim") for i in self._retiring]
        for i in self._instances.values():
            if i.host_bytes:
                holdings.append(Holding("cpu", i.host_bytes, "resident"))
            if i.state is InstanceState.WAITING:
                kind = "waiting"
            elif i.state.allocating:
                kind = "loading"
            elif i.victim_of is not None:
                kind = "victim"
            else:
                kind = "resident"
            holdings.append(Holding(i.device, i.device_bytes, kind))
        return holdings

    def _planning_view(self) -> tuple[list[DeviceRoom], list[Resident]]:
        rooms = [
            DeviceRoom(id=row.device, kind=row.kind, capacity=row.capacity, free=row.free)
            for row in self.ledger()
        ]
        residents = [
            Resident(
                model_id=i.key,
                device=i.device,
                bytes=i.bytes,
                last_used=i.touched,
                loaded_at=i.loaded_at,
                in_flight=i.in_flight + self._waiting.get(i.model_id, 0),
                pinned=i.model_id in self._pinned,
                ready=i.state is InstanceState.READY,
                sleeps=self._may_sleep(i),
            )
            for i in self._instances.values()
        ]
        return rooms, residents

    def _row(self, device: str) -> LedgerRow | None:
        return next((row for row in self.ledger() if row.device == device), None)

    # -- eviction ---------------------------------------------------------------

    async def _evict_instance(
        self, instance: Instance, *, reason: str, trigger: str | None, force: bool = False
    ) -> None:
        instance.state = InstanceState.DRAINING
        if force:
            instance.revoke(f"{instance.model_id} was evicted by an operator")
        self._changed()
        await instance.idle.wait()
        if trigger is not None and not force and self._may_sleep(instance):
            await self._sleep(instance, reason=reason, trigger=trigger)
            return
        resident_s = self._clock() - instance.loaded_at
        freed = instance.device_bytes
        before = self._our_usage(instance.device)
        try:
            await self._unload(instance)
            leaked = await self._verify_release(instance.device, before, freed)
        finally:
            self._forget(instance)
        record = instance.record
        self._record(
            "evict",
            record,
            device=instance.device,
            reason=reason,
            bytes=freed,
            trigger=trigger,
            detail={"resident_s": round(resident_s, 1)},
        )
        log.info(
            "evicted %s from %s (%s%s) after %.0fs, %d bytes",
            instance.model_id,
            instance.device,
            reason,
            f", for {trigger}" if trigger else "",
            resident_s,
            freed,
            extra={
                "event": "evict",
                "model": instance.model_id,
                "device": instance.device,
                "reason": reason,
                "trigger": trigger,
                "bytes": freed,
                "resident_s": round(resident_s, 1),
            },
        )
        if leaked:
            self._leaks.append(Leak(instance.model_id, instance.device, freed))
            self._record(
                "leak",
                record,
                device=instance.device,
                reason=f"memory not back after {self.settings.release_timeout:g}s",
                bytes=freed,
            )
            log.error(
                "%s: %d bytes on %s not released after eviction; kept in the ledger",
                instance.model_id,
                freed,
                instance.device,
            )

    # -- the sleep tier -----------------------------------------------------------

    def _may_sleep(self, instance: Instance) -> bool:
        """Whether evicting ``instance`` for room may put it to sleep instead: its model
        can, it is measured, and the host (the CPU device) has room for its weights."""
        model = instance.loaded_model
        if not (
            isinstance(model, Sleepable)
            and model.can_sleep
            and instance.measured is not None
            and instance.state in (InstanceState.READY, InstanceState.DRAINING)
        ):
            return False
        host = self._row("cpu")
        return host is not None and host.free >= instance.measured.weights

    async def _sleep(self, instance: Instance, *, reason: str, trigger: str) -> None:
        """Put a victim to sleep; it stays an instance, its device bytes come back."""
        model = instance.loaded_model
        assert isinstance(model, Sleepable) and instance.measured is not None
        started = self._clock()
        try:
            await model.sleep()
        except Exception as exc:  # could not sleep: unload it as an ordinary victim
            log.warning("%s could not sleep (%s); unloading it", instance.model_id, exc)
            await self._evict_instance(instance, reason=reason, trigger=None)
            instance.vacated.set()
            return
        instance.host_bytes = instance.measured.weights
        instance.state = InstanceState.SLEEPING
        instance.victim_of = None
        instance.vacated.set()
        self._record(
            "sleep",
            instance.record,
            device=instance.device,
            reason=reason,
            bytes=instance.bytes - instance.device_bytes,
            trigger=trigger,
            duration_ms=round((self._clock() - started) * 1000, 1),
        )
        log.info("%s sleeps (weights in host RAM) to make room for %s", instance.model_id, trigger)
        self._changed()

    def _our_usage(self, device: str) -> int | None:
        """Bytes NVML attributes to this process on a GPU; None on the CPU device."""
        if not device.startswith("cuda"):
            return None
        readings = self._devices.readings()
        ours = {self._pid, *self._children(readings)}
        for reading in readings:
            if reading.id == device:
                return sum(b for p, b in reading.process_bytes.items() if p in ours)
        return None

    async def _verify_release(self, device: str, before: int | None, freed: int) -> bool:
        """True (leaked) unless the device shows ~``freed`` bytes back in time."""
        if before is None or freed <= 0:
            return False
        deadline = self._clock() + self.settings.release_timeout
        while True:
            now_usage = self._our_usage(device)
            if now_usage is None or before - now_usage >= int(freed * 0.9):
                return False
            if self._clock() >= deadline:
                return True
            await asyncio.sleep(min(0.05, max(deadline - self._clock(), 0)))

    async def _unload(self, instance: Instance) -> None:
        instance.state = InstanceState.UNLOADING
        batcher = instance.detach_batcher()
        if batcher is not None:
            await batcher.close()
        model = instance.detach()
        try:
            if model is not None:
                await instance.run(model.unload)
        finally:
            instance.close_executor()

    def _forget(self, instance: Instance) -> None:
        if self._instances.get(instance.key) is instance:
            del self._instances[instance.key]
        instance.host_bytes = 0
        instance.gone.set()
        instance.vacated.set()
        self._changed()

    # -- failed instances ---------------------------------------------------------

    def _watch_health(self, instance: Instance) -> None:
        """Have ``instance`` report repeated backend failures or a hang to us."""
        instance.max_failures = self.settings.max_failures
        instance.stop_timeout = self.settings.stop_timeout
        instance.on_failed = self._instance_failed

    def _instance_failed(self, instance: Instance, reason: str) -> None:
        """Retire a failed instance: report it, stop routing to it, unload it.

        It leaves the instance table at once, so the next request for the version
        starts a fresh load (a pinned version is loaded again right away); its bytes
        stay in the ledger until the unload has given them back.
        """
        if instance.state is not InstanceState.READY or (
            self._instances.get(instance.key) is not instance
        ):
            return  # already leaving
        record = instance.record
        previous = self._failures.get(instance.model_id)
        self._failures[instance.model_id] = Failure(
            model=record.name,
            version=record.version,
            device=instance.device,
            reason=reason,
            at=time.time(),
            times=1 + (previous.times if previous is not None else 0),
        )
        self._record(
            "failed",
            record,
            device=instance.device,
            reason=reason,
            detail={"failures_in_a_row": instance.failures},
        )
        log.error("%s on %s failed: %s; unloading it", instance.key, instance.device, reason)
        instance.state = InstanceState.DRAINING
        instance.revoke(f"{instance.model_id} failed and is being restarted: {reason}")
        del self._instances[instance.key]
        self._retiring.append(instance)
        self._spawn(self._retire(instance), name=f"retire {instance.key}")
        self._changed()

    async def _retire(self, instance: Instance) -> None:
        """Unload a failed instance; a thread stuck in the model is given up on.

        Live requests were told to stop; they get ``stop_timeout`` to do so. An unload
        that does not finish within ``release_timeout`` (its thread is still stuck)
        goes on in the background, and its bytes are reported as leaked until it does.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(instance.idle.wait(), self.settings.stop_timeout)
        freed = instance.bytes
        before = self._our_usage(instance.device)
        unload = asyncio.ensure_future(self._unload(instance))
        done, _ = await asyncio.wait([unload], timeout=self.settings.release_timeout)
        leaked = not done
        if done and unload.exception() is not None:
            log.error("unloading failed %s: %s", instance.key, unload.exception())
        elif done:
            leaked = await self._verify_release(instance.device, before, freed)
        self._retiring.remove(instance)
        instance.gone.set()
        self._record("evict", instance.record, device=instance.device, reason="failed", bytes=freed)
        if leaked:
            leak = Leak(instance.model_id, instance.device, freed)
            self._leaks.append(leak)
            self._record(
                "leak",
                instance.record,
                device=instance.device,
                reason="a failed instance did not unload in time",
                bytes=freed,
            )
            if not done:
                unload.add_done_callback(lambda _: self._unleak(leak))
        self._changed()
        if instance.model_id in self._pinned and not self._closing:
            self._reload_pinned(instance.record)

    def _unleak(self, leak: Leak) -> None:
        """A stuck unload finished after all: its bytes are free again."""
        if leak in self._leaks:
            self._leaks.remove(leak)
            self._changed()

    def _reload_pinned(self, record: VersionRecord) -> None:
        """Load a pinned version again after its instance failed (the scheduler does)."""

    # -- keep-alive -------------------------------------------------------------

    def _idle_limit(self, instance: Instance) -> tuple[float, str]:
        """How long ``instance`` may stay idle, and the eviction reason when it has.

        Replicas beyond a model's ``replicas`` were added for load; they leave after
        ``scale_down_idle`` (if that is sooner than the keep-alive).
        """
        options = instance.record.options
        if instance.replica >= int(options.get("replicas", 1)):
            scale_down = float(options.get("scale_down_idle", self.settings.scale_down_idle))
            if scale_down < instance.keep_alive:
                return scale_down, "scale-down"
        return instance.keep_alive, "ttl"

    async def _reap_idle(self) -> None:
        """Unload idle instances whose keep_alive ran out (``ttl``, or ``scale-down``)."""
        while not self._closing:
            now = self._clock()
            wake = 1.0
            for instance in list(self._instances.values()):
                limit, reason = self._idle_limit(instance)
                if (
                    instance.state not in (InstanceState.READY, InstanceState.SLEEPING)
                    or instance.in_flight
                    or instance.queued
                    or instance.model_id in self._waiting
                    or instance.model_id in self._pinned
                    or math.isinf(limit)
                ):
                    continue
                remaining = instance.touched + limit - now
                if remaining <= 0:
                    instance.state = InstanceState.DRAINING
                    self._spawn(
                        self._evict_instance(instance, reason=reason, trigger=None),
                        name=f"expire {instance.key}",
                    )
                else:
                    wake = min(wake, remaining)
            self._reaper_looks_at = now + max(wake, 0.01)
            await self._wait_for_change(max(wake, 0.01), reaper=True)

    async def _poll_devices(self) -> None:
        """Refresh the device readings that status pages show, every poll_interval."""
        while not self._closing:
            try:
                await asyncio.to_thread(self._devices.readings)
            except Exception as exc:  # a flaky NVML read must not stop polling
                log.warning("reading devices failed: %s", exc)
            self._flush_events()  # events kept while the database was locked
            await asyncio.sleep(self.settings.poll_interval)

    # -- plumbing ---------------------------------------------------------------

    def _expires_before_reaper_looks(self, instance: Instance) -> bool:
        """Whether an instance that just went idle runs out before the reaper's next look.

        Only then must a released lease wake the reaper; otherwise its own timer is
        soon enough, and a busy server does not pay a scan of every instance per request.
        """
        limit, _ = self._idle_limit(instance)
        return instance.touched + limit < self._reaper_looks_at

    def _changed(self, *, wake_reaper: bool = True) -> None:
        """Wake everything waiting for room, and the reaper unless told it need not look."""
        if self._change_waiters or (wake_reaper and self._reaper_waiters):  # else: no lists
            waiters, self._change_waiters = self._change_waiters, []
            if wake_reaper:
                waiters += self._reaper_waiters
                self._reaper_waiters = []
            for waiter in waiters:
                _wake(waiter)
        if self._on_change is not None:
            self._on_change(self)

    async def _wait_for_change(self, timeout: float, *, reaper: bool = False) -> None:
        """Sleep until the next ``_changed`` or ``timeout``, whichever comes first.

        A bare future and a timer rather than ``asyncio.wait_for``: this runs often,
        and wait_for would create a task each time.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._reaper_waiters if reaper else self._change_waiters
        waiters.append(waiter)
        timer = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in waiters:  # timed out: do not keep it until a change
                waiters.remove(waiter)

    def _spawn(self, coro: Any, *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %s", name, t.exception())

        task.add_done_callback(done)

    def _record(self, kind: str, record: VersionRecord, **fields: Any) -> None:
        """Log an event; if the database cannot take it now (locked by another process),
        keep it and write it with the next one, so no event is lost and no load fails
        for want of its log line. Observers (metrics) see it at once."""
        self._unrecorded.append((kind, record, fields))
        self._flush_events()
        if self.observer is not None:
            self.observer.event(kind, record, fields)

    def _flush_events(self) -> None:
        while self._unrecorded:
            kind, record, fields = self._unrecorded[0]
            try:
                self._store.record_event(kind, record.name, record.version, **fields)
            except StoreError as exc:
                log.warning(
                    "event log not written yet (%d waiting): %s", len(self._unrecorded), exc
                )
                return
            self._unrecorded.pop(0)

    def _observe_batch(self, instance: Instance, rows: int) -> None:
        if self.observer is not None:
            self.observer.batch(instance.record, rows)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
