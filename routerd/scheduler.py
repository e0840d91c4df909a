"""The scheduler: the one owner of residency (DESIGN.md rule 1).

Only this module creates, loads and removes instances. Request handlers ask for a
lease; operators ask for a load, an eviction or a pin; everything else reads
snapshots. All of its state lives on the event loop and is changed only from it, so
no lock is needed: between two ``await`` points nothing else interleaves, and every
plan is committed in the same step that computed it.

``lease(record)`` — decision tree:

1. The version has a READY instance → lease it at once.
2. A load of that version is in flight → wait for that same load (single flight).
3. Its instance is being evicted → wait until it is gone, then go to 4.
4. Nothing is resident → one load: estimate (or recall the measured) footprint on
   each device kind, ask the placement policy for a plan; a plan is committed at
   once (victims start draining, the bytes are claimed); a refusal that may pass
   is waited out up to ``load_wait_timeout`` (then 503 with Retry-After); a final
   refusal (too large, pinned) is 503 at once.
5. The load runs after its victims are gone; out of memory (or measured larger
   than the room) → free it, evict more, retry once; then 503 with the reason.
6. The load outlasts ``load_timeout`` → 503 for this waiter; the load carries on.

The lease is released in ``__aexit__`` (rule 3), cancellation included, and an
instance with a live lease is never unloaded: eviction drains first, unless an
operator forces it, which stops the live requests with a clear error.

Background work (``start``): the keep-alive reaper unloads idle instances whose
``keep_alive`` ran out, and pinned versions are loaded again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from backends.base import (
    WARMING_UP,
    Backend,
    BackendError,
    Footprint,
    LoadProgress,
    LoadSpec,
    OutOfMemory,
    Sleepable,
)
from policies.placement import PlacementPolicy
from policies.registry import create as create_policy
from policies.routing import Candidate, RouteRequest, RoutingPolicy
from policies.types import LoadRequest, Plan
from routerd.admission import QueueState, moving_average, retry_after
from routerd.batcher import Batcher, batching_policy
from routerd.config import parse_keep_alive
from routerd.errors import Draining, LoadFailed, NotFound, QueueFull, Unavailable
from routerd.instance import Instance, InstanceSnapshot, InstanceState
from routerd.registry import SCHEDULER_OPTIONS
from routerd.residency import (
    DeviceSnapshot,
    Leak,
    Lease,
    ResidencyCore,
    ResidencyStore,
    SchedulerSettings,
)
from state import StoreError, VersionRecord

__all__ = [
    "DeviceSnapshot",
    "Leak",
    "Lease",
    "ResidencyStore",
    "Scheduler",
    "SchedulerSettings",
    "preferences_of",
]

log = logging.getLogger("routerd.scheduler")


class _RetryLoad(Exception):
    """Internal: the attempt failed for lack of memory; plan again with ``need``."""

    def __init__(self, need: Mapping[str, int], reason: str) -> None:
        super().__init__(reason)
        self.need = need
        self.reason = reason


def preferences_of(record: VersionRecord) -> list[str]:
    devices = record.options.get("devices")
    if isinstance(devices, list) and devices:
        return [str(d) for d in devices]
    return [str(record.options.get("device", "auto"))]


class Scheduler(ResidencyCore):
    """Owns every instance; see the module docstring for how a lease is served."""

    # -- lifecycle --------------------------------------------------------------

    async def start(self, resolve: Callable[[str], VersionRecord | None]) -> None:
        """Start the keep-alive reaper and load pinned versions again (in the background)."""
        self._background.append(asyncio.create_task(self._reap_idle(), name="keep-alive"))
        self._background.append(asyncio.create_task(self._poll_devices(), name="device poll"))
        for model_id in sorted(self._pinned):
            record = resolve(model_id)
            if record is not None:
                self._spawn(self._restore(record), name=f"restore {model_id}")

    def _reload_pinned(self, record: VersionRecord) -> None:
        self._spawn(self._restore(record), name=f"restore {record.model_id}")

    async def _restore(self, record: VersionRecord) -> None:
        try:
            await self.load(record, why="restore")
        except Exception as exc:
            log.warning("pinned %s could not be loaded at start: %s", record.model_id, exc)

    async def close(self) -> None:
        """Stop for shutdown: refuse new leases, wait for loads, unload everything.

        The HTTP server has already waited for in-flight requests by the time this
        runs, so the drain here is normally instant.
        """
        self._closing = True
        self._changed()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._loads:
            await asyncio.wait(list(self._loads.values()))
        for model_id in list(self._instances):
            try:
                await self.evict(model_id, reason="shutdown")
            except Exception:  # one bad unload must not keep the others resident
                log.exception("unloading %s at shutdown failed", model_id)
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    @property
    def running(self) -> bool:
        return not self._closing

    # -- requests ---------------------------------------------------------------

    def lease(self, record: VersionRecord, *, keep_alive: float | None = None) -> LeaseHold:
        """Hold a READY instance of ``record`` for the whole ``async with`` body.

        ``keep_alive`` (a request's own) replaces the instance's from now on. When
        ``max_queue`` requests already wait for the version, 429 (``QueueFull``).
        """
        return LeaseHold(self, record, keep_alive)

    async def _take_lease(self, record: VersionRecord) -> tuple[Lease, float]:
        """Entering a lease (``LeaseHold``): the instance, and when it was acquired."""
        self._admit(record)
        started = self._clock()
        instance, waited = await self._ready_instance(record, device=None, why="request")
        acquired = self._clock()
        instance.acquire(acquired)
        cold_start_ms = (acquired - started) * 1000 if waited else None
        return Lease(instance=instance, cold_start_ms=cold_start_ms), acquired

    def _give_back(self, lease: Lease, acquired: float, keep_alive: float | None) -> None:
        """Leaving a lease (``LeaseHold``): release the instance, learn its service time."""
        instance = lease.instance
        if keep_alive is not None:
            instance.keep_alive = keep_alive
        released = self._clock()
        key = instance.record.model_id
        self._service_s[key] = moving_average(self._service_s.get(key), released - acquired)
        instance.release(released)
        self._changed(
            wake_reaper=not instance.in_flight and self._expires_before_reaper_looks(instance)
        )

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting per version: for a lease (a load) or in a batch queue."""
        depths = dict(self._waiting)
        for instance in self._instances.values():
            if instance.queued:
                key = instance.model_id
                depths[key] = depths.get(key, 0) + instance.queued
        return depths

    def _admit(self, record: VersionRecord) -> None:
        """Refuse a request (429) when ``max_queue`` requests already wait for its version."""
        limit = int(record.options.get("max_queue", self.settings.max_queue))
        if limit <= 0:
            return
        key = record.model_id
        waiting = self._waiting.get(key, 0)
        replicas = self._version_replicas(record)
        for replica in replicas:
            waiting += replica.queued
        if waiting < limit:
            return
        loading = [i for i in replicas if i.state.loading]
        state = QueueState(
            waiting=waiting,
            service_s=self._service_s.get(key),
            concurrent=sum(i.in_flight for i in replicas if i.state is InstanceState.READY),
            load_s=self._load_s.get(key),
            loading_for_s=(self._clock() - loading[0].placed_at) if loading else None,
        )
        raise QueueFull(
            f"{key} already has {waiting} requests waiting (max_queue {limit}); retry later",
            retry_after=retry_after(state),
        )

    async def _ready_instance(
        self, record: VersionRecord, *, device: str | None, why: str
    ) -> tuple[Instance, bool]:
        """A READY instance, and whether this call had to wait for it.

        While a request waits, it counts as demand on its version (``_waiting``):
        a freshly loaded instance is not idle, and so not evictable, until the
        requests that waited for it have taken their leases. Without this, two
        loads competing for the same room evict each other's fresh instances before
        either serves anything.
        """
        chosen = self._ready_now(record)
        if chosen is not None:
            return chosen, False  # the common case: no wait, so no demand to count
        key = record.model_id
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            return await self._wait_ready(record, device=device, why=why)
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    def _ready_now(self, record: VersionRecord) -> Instance | None:
        """The READY replica the routing policy picks for ``record`` now, or None.

        Picking one may start another replica when every one is busy
        (``max_replicas``); a daemon shutting down answers 503 instead.
        """
        if self._closing:
            raise Draining("routerd is shutting down", retry_after=5)
        replicas = self._version_replicas(record)
        chosen = self._route(record, replicas)
        if chosen is not None:
            self._scale_up_if_busy(record, replicas)
        return chosen

    async def _wait_ready(
        self, record: VersionRecord, *, device: str | None, why: str
    ) -> tuple[Instance, bool]:
        """Wait until ``_ready_now`` has an instance: for a drain, a wake-up or a load."""
        while True:
            chosen = self._ready_now(record)
            if chosen is not None:
                return chosen, True
            instance = self._instances.get(record.model_id)
            if instance is not None and instance.state in (
                InstanceState.DRAINING,
                InstanceState.UNLOADING,
            ):
                await instance.vacated.wait()  # gone, or asleep (then woken below)
                if instance.state is InstanceState.DRAINING and not instance.gone.is_set():
                    await instance.gone.wait()
                continue
            if instance is not None and instance.state is InstanceState.SLEEPING:
                await self._await_wake(instance)
                continue
            await self._await_load(record, device, why)

    async def _await_load(self, record: VersionRecord, device: str | None, why: str) -> Instance:
        """Join the version's load in flight, or start it (``why`` goes to the event log)."""
        task = self._loads.get(record.model_id)
        if task is None:
            task = asyncio.create_task(
                self._load(record, device, why), name=f"load {record.model_id}"
            )
            self._loads[record.model_id] = task
            task.add_done_callback(self._load_done)
        try:
            # shield: a waiter that gives up (timeout, client gone) must not cancel
            # the load the other waiters share.
            return await asyncio.wait_for(asyncio.shield(task), self.settings.load_timeout)
        except TimeoutError:
            raise Unavailable(
                f"{record.model_id} is still loading after {self.settings.load_timeout:.0f}s",
                retry_after=5,
            ) from None

    def _load_done(self, task: asyncio.Task[Instance]) -> None:
        for key, known in list(self._loads.items()):
            if known is task:
                del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters that gave up must not leave it unseen
        self._changed()

    # -- replicas and routing -----------------------------------------------------

    def _replicas(self, model_id: str) -> list[Instance]:
        return [i for i in self._instances.values() if i.record.model_id == model_id]

    def _version_replicas(self, record: VersionRecord) -> list[Instance]:
        """``record``'s instances: one lookup, without scanning them all, when the
        version may run only one (no ``replicas`` or ``max_replicas`` option)."""
        first = self._instances.get(record.model_id)
        if first is not None and _REPLICA_OPTIONS.isdisjoint(record.options):
            return [first]
        return self._replicas(record.model_id)

    def _route(self, record: VersionRecord, replicas: list[Instance]) -> Instance | None:
        """The READY replica the routing policy ranks first, or None if none is ready."""
        ready = [i for i in replicas if i.state is InstanceState.READY]
        if len(ready) <= 1:
            return ready[0] if ready else None
        name = str(record.options.get("routing", self.settings.routing))
        ranked = self._routing_policy(name).rank(
            RouteRequest(record.model_id),
            [
                Candidate(
                    key=i.key,
                    device=i.device,
                    resident=i.state is InstanceState.READY,
                    in_flight=i.in_flight,
                    queued=i.queued,
                )
                for i in replicas
            ],
        )
        by_key = {i.key: i for i in ready}
        return next((by_key[c.key] for c in ranked if c.key in by_key), ready[0])

    def _routing_policy(self, name: str) -> RoutingPolicy:
        if name not in self._routing_policies:
            self._routing_policies[name] = create_policy("routing", name)
        policy: RoutingPolicy = self._routing_policies[name]
        return policy

    def _scale_up_if_busy(self, record: VersionRecord, replicas: list[Instance]) -> None:
        """Add a replica when below ``replicas``, or when every replica is busy.

        Busy: at least ``scale_up_queue`` requests in flight or queued on each ready
        replica. At most ``max_replicas``; one replica load at a time per version;
        only where memory allows without evicting anything.
        """
        options = record.options
        if _REPLICA_OPTIONS.isdisjoint(options) and replicas:
            return  # the usual version: one instance, and it exists
        minimum = int(options.get("replicas", 1))
        maximum = max(int(options.get("max_replicas", minimum)), minimum)
        if len(replicas) >= maximum or any(i.state is not InstanceState.READY for i in replicas):
            return
        threshold = int(options.get("scale_up_queue", 4))
        busy = all(i.in_flight + i.queued >= threshold for i in replicas)
        if len(replicas) >= minimum and not busy:
            return
        taken = {i.replica for i in replicas}
        replica = next(n for n in range(maximum) if n not in taken)
        self._spawn(self._add_replica(record, replica), name=f"replica {record.model_id}#{replica}")

    async def _add_replica(self, record: VersionRecord, replica: int) -> None:
        key = f"{record.model_id}#{replica}" if replica else record.model_id
        task = asyncio.create_task(self._load(record, None, "scale-up", replica=replica))
        self._loads[key] = task
        task.add_done_callback(self._load_done)
        try:
            await task
        except Unavailable as exc:
            log.info("%s: not adding replica %d: %s", record.model_id, replica, exc.message)

    # -- operators --------------------------------------------------------------

    async def load(
        self, record: VersionRecord, *, device: str | None = None, why: str = "manual"
    ) -> InstanceSnapshot:
        """Make ``record`` resident (on ``device`` if given) or return the resident one."""
        instance, _ = await self._ready_instance(record, device=device, why=why)
        return self._snapshot(instance)

    async def evict(
        self, model_id: str, *, reason: str = "manual", force: bool = False
    ) -> InstanceSnapshot:
        """Drain (no new leases; live ones finish) and unload every replica of ``model_id``.

        ``force`` ends live requests at once, each with a clear error. Returns the
        first replica as it was before it left.
        """
        replicas = sorted(self._replicas(model_id), key=lambda i: i.replica)
        if not replicas:
            raise NotFound(f"{model_id} is not loaded", param="model")
        snapshots = await asyncio.gather(
            *(self._evict_replica(i, reason=reason, force=force) for i in replicas)
        )
        return snapshots[0]

    async def _evict_replica(
        self, instance: Instance, *, reason: str, force: bool
    ) -> InstanceSnapshot:
        if instance.state in (InstanceState.WAITING, InstanceState.LOADING, InstanceState.WARMING):
            task = self._loads.get(instance.key)
            if task is not None:
                await asyncio.wait([task])
            if self._instances.get(instance.key) is not instance:
                return self._snapshot(instance)
        snapshot = self._snapshot(instance)
        if instance.state not in (InstanceState.READY, InstanceState.SLEEPING):
            if force:
                instance.revoke(f"{instance.model_id} was evicted by an operator")
            await instance.gone.wait()
            return snapshot
        await self._evict_instance(instance, reason=reason, trigger=None, force=force)
        return snapshot

    def evict_later(self, model_id: str, *, reason: str) -> None:
        """Drain and unload ``model_id`` in the background (e.g. a reload changed it)."""
        self._spawn(self.evict(model_id, reason=reason), name=f"evict {model_id}")

    def reconfigure(self, settings: SchedulerSettings, placement: PlacementPolicy) -> None:
        """New settings and placement take effect from the next decision (reload)."""
        self.settings = settings
        self._placement = placement
        self._changed()

    def pin(self, record: VersionRecord) -> None:
        """Never evict this version (operators may still evict it by hand)."""
        self._store.set_pinned(record.name, record.version, True)
        self._pinned.add(record.model_id)
        self._changed()

    def unpin(self, record: VersionRecord) -> None:
        self._store.set_pinned(record.name, record.version, False)
        self._pinned.discard(record.model_id)
        self._changed()

    # -- loading ----------------------------------------------------------------

    async def _load(
        self, record: VersionRecord, device: str | None, why: str, *, replica: int = 0
    ) -> Instance:
        """Estimate, place, wait for victims, load, warm up, measure; retry once on OOM."""
        try:
            backend = self._backends.get(record.backend)
        except ValueError as exc:
            self._record("load_failed", record, reason=str(exc))
            raise LoadFailed(f"cannot load {record.model_id}: {exc}") from exc
        preferences = [device] if device else preferences_of(record)
        estimates = await self._estimates(record, backend)
        need = {d: self._need(record, estimates, d) for d in self._devices.device_ids()}
        retried: str | None = None
        while True:
            instance = await self._place(
                record, preferences, need, estimates, retried, replica=replica
            )
            try:
                return await self._bring_up(instance, backend, need, why)
            except _RetryLoad as retry:
                if retried is not None:
                    self._record("load_failed", record, device=instance.device, reason=retry.reason)
                    raise LoadFailed(
                        f"loading {record.model_id} failed: {retry.reason} (after one retry)"
                    ) from None
                log.warning(
                    "%s: %s; evicting more and retrying once", record.model_id, retry.reason
                )
                retried = retry.reason
                need = dict(retry.need)

    async def _estimates(self, record: VersionRecord, backend: Backend) -> dict[str, int]:
        """Bytes per device kind: the stored measurement if any, else the estimate."""
        estimates: dict[str, int] = {}
        for device_id in self._devices.device_ids():
            kind = device_id.split(":")[0]
            if kind in estimates:
                continue
            spec = self._spec(record, device_id)
            try:
                estimate = await asyncio.to_thread(backend.estimate_footprint, spec)
            except (BackendError, OSError, ValueError) as exc:
                self._record("load_failed", record, device=device_id, reason=str(exc))
                raise LoadFailed(f"cannot load {record.model_id}: {exc}") from exc
            estimates[kind] = estimate.total
        return estimates

    def _need(self, record: VersionRecord, estimates: Mapping[str, int], device_id: str) -> int:
        kind = device_id.split(":")[0]
        stored = self._store.measured_footprint(record.name, record.version, kind)
        if stored is not None and getattr(stored, "measured_bytes", None):
            return int(stored.measured_bytes)
        return estimates[kind]

    def _spec(self, record: VersionRecord, device: str) -> LoadSpec:
        scheduler_keys = set(SCHEDULER_OPTIONS)
        return LoadSpec(
            name=record.name,
            version=record.version,
            path=record.path,
            options={k: v for k, v in record.options.items() if k not in scheduler_keys},
            device=device,
        )

    async def _place(
        self,
        record: VersionRecord,
        preferences: Sequence[str],
        need: Mapping[str, int],
        estimates: Mapping[str, int],
        retried: str | None,
        *,
        replica: int = 0,
    ) -> Instance:
        """Plan until a plan comes (committed at once) or the wait runs out.

        An extra replica (``replica`` > 0) is only added where memory allows it now:
        it neither waits nor evicts anything.
        """
        deadline = self._clock() + self.settings.load_wait_timeout
        key = record.model_id if replica == 0 else f"{record.model_id}#{replica}"
        request = LoadRequest(key, preferences, need)
        while True:
            if self._closing:
                raise Draining("routerd is shutting down", retry_after=5)
            rooms, residents = self._planning_view()
            decision = self._placement.place(
                request,
                rooms,
                residents,
                now=self._clock(),
                min_residency=self.settings.min_residency,
            )
            if isinstance(decision, Plan) and (replica == 0 or not decision.evict):
                return self._commit(record, decision, need, estimates, retried, replica)
            if replica:
                raise Unavailable(f"no free room for another replica of {record.model_id}")
            assert not isinstance(decision, Plan)
            if not decision.retry:
                self._record("load_failed", record, reason=decision.reason)
                raise Unavailable(decision.reason, code="insufficient_memory")
            remaining = deadline - self._clock()
            if remaining <= 0:
                self._record("load_failed", record, reason=decision.reason)
                raise Unavailable(
                    f"{decision.reason} (waited {self.settings.load_wait_timeout:g}s)",
                    code="insufficient_memory",
                    retry_after=max(self.settings.min_residency, 1.0),
                )
            await self._wait_for_change(min(remaining, 0.25))

    def _commit(
        self,
        record: VersionRecord,
        plan: Plan,
        need: Mapping[str, int],
        estimates: Mapping[str, int],
        retried: str | None,
        replica: int = 0,
    ) -> Instance:
        """Make the plan true in one step: the new instance claims its bytes, victims drain."""
        keep_alive = record.options.get("keep_alive")
        instance = Instance(
            record,
            plan.device,
            reserved_bytes=need[plan.device],
            estimated_bytes=estimates[plan.device.split(":")[0]],
            keep_alive=(
                self.settings.keep_alive
                if keep_alive is None
                else parse_keep_alive(keep_alive, key="keep_alive")
            ),
            now=self._clock(),
            replica=replica,
        )
        self._instances[instance.key] = instance
        reason = "oom-retry" if retried else self._placement.eviction.name
        for victim_id in plan.evict:
            victim = self._instances[victim_id]
            victim.victim_of = instance.key
            victim.state = InstanceState.DRAINING
            self._spawn(
                self._evict_instance(victim, reason=reason, trigger=instance.key),
                name=f"evict {victim_id}",
            )
        if plan.evict:
            log.info(
                "placing %s on %s: evicting %s (%s)",
                record.model_id,
                plan.device,
                ", ".join(plan.evict),
                reason,
            )
        self._changed()
        return instance

    async def _bring_up(
        self, instance: Instance, backend: Backend, need: Mapping[str, int], why: str
    ) -> Instance:
        record = instance.record
        victims = [i for i in self._instances.values() if i.victim_of == instance.key]
        await asyncio.gather(*(v.vacated.wait() for v in victims))
        # Other loads' victims may still be leaving; a leak may have kept bytes. Start
        # allocating only once used + this reservation fits the capacity.
        deadline = self._clock() + self.settings.load_wait_timeout
        while (row := self._row(instance.device)) is not None and (
            row.used + instance.reserved_bytes > row.capacity
        ):
            if self._clock() >= deadline:
                await self._discard(instance)
                raise _RetryLoad(need, f"memory on {instance.device} did not come back as planned")
            await self._wait_for_change(0.1)
        instance.state = InstanceState.LOADING
        self._changed()
        log.debug("loading %s on %s", record.model_id, instance.device)
        spec = replace(
            self._spec(record, instance.device),
            progress=instance.report_progress,
            grant_bytes=instance.reserved_bytes,
        )
        try:
            model = await instance.run(backend.load, spec)
            instance.attach(model)
            instance.state = InstanceState.WARMING
            instance.progress = LoadProgress(WARMING_UP)
            await instance.run(model.warm_up)
            measured: Footprint = await instance.run(model.measure_footprint)
        except OutOfMemory as exc:
            await self._discard(instance)
            raise _RetryLoad(
                self._grown(need, instance.device, 1.5), f"out of memory: {exc}"
            ) from None
        except BaseException as exc:
            await self._discard(instance)
            reason = str(exc) or type(exc).__name__
            self._record("load_failed", record, device=instance.device, reason=reason)
            log.warning(
                "loading %s on %s failed: %s",
                record.model_id,
                instance.device,
                reason,
                extra={"event": "load_failed", "model": record.model_id, "device": instance.device},
            )
            if isinstance(exc, Exception):
                raise LoadFailed(f"loading {record.model_id} failed: {reason}") from exc
            raise
        instance.measured = measured
        self._remember_footprint(instance, measured)
        overrun = self._row(instance.device)
        over = overrun.over_budget if overrun is not None else 0
        if over > 0 and not await self._make_room(instance, over):
            await self._discard(instance)
            grown = self._grown(need, instance.device, 1.0, at_least=measured.total)
            raise _RetryLoad(
                grown,
                f"measured {measured.total} bytes, more than the {instance.reserved_bytes} "
                f"planned, and {instance.device} has no room for the difference",
            )
        policy = batching_policy(record.options, instance.device)
        instance.attach_batcher(Batcher(instance, policy, on_batch=self._observe_batch))
        self._watch_health(instance)
        instance.load_ms = (self._clock() - instance.placed_at) * 1000
        self._load_s[record.model_id] = instance.load_ms / 1000
        instance.progress = None
        instance.loaded_at = instance.touched = self._clock()
        instance.state = InstanceState.READY
        self._record(
            "load",
            record,
            device=instance.device,
            reason=why,
            bytes=measured.total,
            duration_ms=round(instance.load_ms, 1),
            detail={
                "estimated_bytes": instance.estimated_bytes,
                "weights": measured.weights,
                "runtime": measured.runtime,
                "working": measured.working,
            },
        )
        log.info(
            "loaded %s on %s: %d bytes (estimated %d) in %.0f ms",
            record.model_id,
            instance.device,
            measured.total,
            instance.estimated_bytes,
            instance.load_ms,
            extra={
                "event": "load",
                "model": record.model_id,
                "device": instance.device,
                "reason": why,
                "bytes": measured.total,
                "estimated_bytes": instance.estimated_bytes,
                "duration_ms": round(instance.load_ms, 1),
            },
        )
        self._changed()
        return instance

    def _remember_footprint(self, instance: Instance, measured: Footprint) -> None:
        """Store the measurement for later placements; a database that cannot take it
        now (locked) costs only the measurement, never the load."""
        record = instance.record
        try:
            self._store.record_footprint(
                record.name,
                record.version,
                instance.device.split(":")[0],
                measured={
                    "weights": measured.weights,
                    "runtime": measured.runtime,
                    "working": measured.working,
                },
                estimated_bytes=instance.estimated_bytes,
            )
        except StoreError as exc:
            log.warning("%s: footprint not stored: %s", record.model_id, exc)

    # -- waking a sleeping instance ----------------------------------------------------

    async def _await_wake(self, instance: Instance) -> None:
        """Join the wake-up in flight for ``instance``, or start it (single flight)."""
        task = self._loads.get(instance.key)
        if task is None:
            task = asyncio.create_task(self._wake(instance), name=f"wake {instance.key}")
            self._loads[instance.key] = task
            task.add_done_callback(self._load_done)
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.load_timeout)
        except TimeoutError:
            raise Unavailable(
                f"{instance.model_id} is still waking after {self.settings.load_timeout:.0f}s",
                retry_after=5,
            ) from None

    async def _wake(self, instance: Instance) -> Instance:
        """Make room on its device (evicting by the policy, as a load does), then wake it."""
        record = instance.record
        need = instance.bytes - instance.device_bytes
        request = LoadRequest(instance.key, [instance.device], {instance.device: need})
        deadline = self._clock() + self.settings.load_wait_timeout
        while True:
            rooms, residents = self._planning_view()
            decision = self._placement.place(
                request,
                rooms,
                [r for r in residents if r.model_id != instance.key],
                now=self._clock(),
                min_residency=self.settings.min_residency,
            )
            if isinstance(decision, Plan):
                break
            if not decision.retry or self._clock() >= deadline:
                raise Unavailable(
                    f"{record.model_id} is asleep and {instance.device} has no room to wake it: "
                    f"{decision.reason}",
                    code="insufficient_memory",
                    retry_after=max(self.settings.min_residency, 1.0),
                )
            await self._wait_for_change(0.25)
        leaving = [self._instances[v] for v in decision.evict]
        for victim in leaving:
            victim.victim_of = instance.key
            victim.state = InstanceState.DRAINING
            self._spawn(
                self._evict_instance(
                    victim, reason=self._placement.eviction.name, trigger=instance.key
                ),
                name=f"evict {victim.key}",
            )
        # Claimed while its victims leave, reserved once they are gone (as a load is).
        instance.state = InstanceState.WAITING
        instance.vacated.clear()
        self._changed()
        await asyncio.gather(*(v.vacated.wait() for v in leaving))
        instance.state = InstanceState.LOADING
        self._changed()
        model = instance.loaded_model
        assert isinstance(model, Sleepable)
        started = self._clock()
        try:
            await model.wake_up()
        except BaseException as exc:
            reason = str(exc) or type(exc).__name__
            await self._discard(instance)
            self._record("load_failed", record, device=instance.device, reason=reason)
            if isinstance(exc, Exception):
                raise LoadFailed(f"waking {record.model_id} failed: {reason}") from exc
            raise
        instance.host_bytes = 0
        instance.state = InstanceState.READY
        instance.loaded_at = instance.touched = self._clock()
        self._record(
            "wake",
            record,
            device=instance.device,
            reason="request",
            bytes=need,
            duration_ms=round((self._clock() - started) * 1000, 1),
        )
        self._changed()
        return instance

    def _grown(
        self, need: Mapping[str, int], device: str, factor: float, *, at_least: int = 0
    ) -> dict[str, int]:
        grown = dict(need)
        grown[device] = max(int(need[device] * factor), at_least)
        return grown

    async def _make_room(self, instance: Instance, overrun: int) -> bool:
        """Evict idle instances on the device to cover a measured overrun (``pressure``)."""
        _, residents = self._planning_view()
        others = [
            r for r in residents if r.device == instance.device and r.model_id != instance.key
        ]
        victims = self._placement.eviction.victims(
            others, need=overrun, free=0, now=self._clock(), min_residency=0.0
        )
        if victims is None:
            return False
        leaving = [self._instances[v] for v in victims]
        for victim in leaving:
            victim.victim_of = instance.key
            victim.state = InstanceState.DRAINING
            self._spawn(
                self._evict_instance(victim, reason="pressure", trigger=instance.key),
                name=f"evict {victim.model_id}",
            )
        await asyncio.gather(*(v.vacated.wait() for v in leaving))
        return True

    async def _discard(self, instance: Instance) -> None:
        """Remove an instance that never became ready, giving back what it took."""
        await self._unload(instance)
        self._forget(instance)


# Options under which a version may run more than one instance.
_REPLICA_OPTIONS = frozenset(("replicas", "max_replicas"))


class LeaseHold:
    """``Scheduler.lease`` as an ``async with``: a class rather than a generator-based
    context manager, because every request enters one and a generator costs each of
    them a frame, a generator object and two extra awaits."""

    __slots__ = ("_acquired", "_keep_alive", "_lease", "_record", "_scheduler")

    def __init__(
        self, scheduler: Scheduler, record: VersionRecord, keep_alive: float | None
    ) -> None:
        self._scheduler = scheduler
        self._record = record
        self._keep_alive = keep_alive
        self._lease: Lease | None = None
        self._acquired = 0.0

    async def __aenter__(self) -> Lease:
        if self._lease is not None:
            raise RuntimeError("a lease is entered once")
        self._lease, self._acquired = await self._scheduler._take_lease(self._record)
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._scheduler._give_back(lease, self._acquired, self._keep_alive)
