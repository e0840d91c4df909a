"""The scheduler: the one owner of residency (DESIGN.md rule 1).

``Scheduler`` is the coordinator. It owns one of each part and is the only code
that drives them; they never call each other's internals:

- ``Admission`` — who waits for a version, in what order; 429 for a full queue.
- ``Residency`` — the table of instances; snapshots, ledger, planning view.
- ``Planner`` — calls the pure placement/eviction policies and commits a plan.
- ``Lifecycle`` — alone moves instances between states, adds and removes them.
- ``Swap`` — the path of a swap (plan, victims leave, load, warm, ready).
- ``Reaper`` — expires idle instances (keep-alive).
- ``Replicas`` — routes among a version's replicas; says when another is due.
- ``VersionTasks`` — what a version does, known before a load (``task_of``).

Everything runs on the event loop, so no lock is needed: between two ``await``
points nothing else interleaves, and every plan is committed in the step that
computed it. Every wait (timeouts, keep-alive, polls) is on the injected ``Clock``.
Instances report health and load progress as messages (``routerd.messages``)
that ``_consume`` handles in its own loop turn.

``lease(record)`` — decision tree:

1. The version has a READY instance → lease it at once.
2. A load of that version is in flight → wait for that same load (single flight).
3. Its instance is being evicted (draining, offloading, unloading) → wait until it
   is gone or resting in the host tier, then go on.
4. Its instance rests in the host tier (sleeping, offloaded) → one wake-up (single
   flight) brings it back without a load, then lease it.
5. Nothing is resident → one load (``Swap.load``): a plan is committed at once; a
   refusal that may pass is waited out up to ``load_wait_timeout`` (then 503 with
   Retry-After); a final refusal (too large, pinned) is 503 at once.
6. The load outlasts ``load_timeout`` → 503 for this waiter; the load carries on.

The lease is released in ``__aexit__`` (rule 3), cancellation included, and an
instance with a live lease is never unloaded: eviction drains first, unless an
operator forces it, which stops the live requests with a clear error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from backends.registry import BackendRegistry
from contract.generation import Task
from policies.placement import PlacementPolicy
from routerd.clock import Clock, LoopClock
from routerd.devices import DeviceInventory
from routerd.errors import Conflict, Draining, NotFound, Unavailable
from routerd.instance import Instance, InstanceSnapshot
from routerd.memory import LedgerRow
from routerd.messages import InstanceFailed, LoadProgressed, Message
from routerd.scheduler.admission import Admission, ClientGone, unless_gone
from routerd.scheduler.context import Context, Journal, Signals, poll_devices
from routerd.scheduler.keepalive import Reaper
from routerd.scheduler.lifecycle import Lifecycle
from routerd.scheduler.planning import Planner
from routerd.scheduler.replicas import Replicas
from routerd.scheduler.residency import Residency
from routerd.scheduler.settings import (
    DeviceSnapshot,
    Failure,
    Leak,
    Lease,
    SchedulerObserver,
    SchedulerSettings,
    TierSnapshot,
)
from routerd.scheduler.swap import Swap
from routerd.scheduler.tasks import VersionTasks
from routerd.states import InstanceState
from routerd.version_options import options_of
from state import Store, VersionRecord

log = logging.getLogger("routerd.scheduler")

_Start = Callable[[], Coroutine[Any, Any, Instance]]
"""Starts a load or a wake-up: the coroutine a single-flight task runs."""


class Scheduler:
    """Owns every instance; see the module docstring for how a lease is served."""

    def __init__(
        self,
        backends: BackendRegistry,
        devices: DeviceInventory,
        store: Store,
        placement: PlacementPolicy,
        settings: SchedulerSettings | None = None,
        *,
        clock: Clock | None = None,
        our_pid: int | None = None,
        on_change: Callable[[Scheduler], None] | None = None,
        journal: Journal | None = None,  # the event log (default: written to ``store``)
    ) -> None:
        clock = clock or LoopClock()
        self.context = Context(
            backends=backends,
            devices=devices,
            store=store,
            placement=placement,
            settings=settings or SchedulerSettings(),
            clock=clock,
            signals=Signals(clock, None if on_change is None else lambda: on_change(self)),
            journal=journal or Journal(store),
            pid=os.getpid() if our_pid is None else our_pid,
        )
        pinned = {f"{n}@{v}" for n, v in store.pinned_versions()}
        self.residency = Residency(self.context, pinned)
        self.admission = Admission()
        self._lifecycle = Lifecycle(self.context, self.residency, self._post)
        self._planner = Planner(self.context, self.residency, self.admission, self._lifecycle)
        self._swap = Swap(
            self.context, self.residency, self.admission, self._planner, self._lifecycle
        )
        self._reaper = Reaper(self.context, self.residency, self.admission, self._lifecycle)
        self._replicas = Replicas(self.context)
        self._tasks = VersionTasks(self.context, self.residency)
        self._loads: dict[str, asyncio.Task[Instance]] = {}  # single flight, by instance key
        self._waiters: dict[str, int] = {}  # callers waiting on each of ``_loads``
        self._background: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # -- settings -----------------------------------------------------------------

    @property
    def settings(self) -> SchedulerSettings:
        return self.context.settings

    @property
    def placement(self) -> PlacementPolicy:
        return self.context.placement

    @property
    def observer(self) -> SchedulerObserver | None:
        return self.context.journal.observer

    @observer.setter
    def observer(self, observer: SchedulerObserver | None) -> None:
        self.context.journal.observer = observer

    def reconfigure(self, settings: SchedulerSettings, placement: PlacementPolicy) -> None:
        """New settings and placement take effect from the next decision (reload).

        ``check_invariants``, once on, stays on: config never sets it, and a test's
        scheduler must not stop checking because the test reloaded its config."""
        checks = settings.check_invariants or self.context.settings.check_invariants
        self.context.settings = replace(settings, check_invariants=checks)
        self.context.placement = placement
        self.context.signals.changed()

    # -- start and stop -------------------------------------------------------------

    async def start(self, resolve: Callable[[str], VersionRecord | None]) -> None:
        """Start the keep-alive reaper and device polling; load pinned versions again."""
        self._background.append(asyncio.create_task(self._reaper.run(), name="keep-alive"))
        self._background.append(asyncio.create_task(poll_devices(self.context), name="device poll"))
        for model_id in sorted(self.residency.pinned):
            record = resolve(model_id)
            if record is not None:
                self._restore(record)

    def _restore(self, record: VersionRecord) -> None:
        """Load a pinned version (again) in the background."""

        async def restore() -> None:
            try:
                await self.load(record, why="restore")
            except Exception as exc:
                log.warning("pinned %s could not be loaded: %s", record.model_id, exc)

        self.context.background.spawn(restore(), name=f"restore {record.model_id}")

    async def close(self) -> None:
        """Stop for shutdown: refuse new leases, wait for loads, unload everything.

        The HTTP server has already waited for in-flight requests by the time this
        runs, so the drain here is normally instant.
        """
        self.context.closing = True
        self.context.signals.changed()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._loads:
            await asyncio.wait(list(self._loads.values()))
        for model_id in list(self.residency.instances):
            try:
                await self.evict(model_id, reason="shutdown")
            except Exception:  # one bad unload must not keep the others resident
                log.exception("unloading %s at shutdown failed", model_id)
        await self.context.background.finish()

    @property
    def running(self) -> bool:
        return not self.context.closing

    # -- messages from instances --------------------------------------------------------

    def _post(self, message: Message) -> None:
        """Where instances send messages; from any thread, consumed on the loop in a
        turn of its own (the loop is known from the first load, before any instance)."""
        loop = self._loop
        assert loop is not None, "no instance exists before the first load"
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self._consume, message)
        else:
            loop.call_soon_threadsafe(self._consume, message)

    def _consume(self, message: Message) -> None:
        if isinstance(message, InstanceFailed):
            if self._lifecycle.fail(message.instance, message.reason):
                self.context.background.spawn(
                    self._retire(message.instance), name=f"retire {message.instance.key}"
                )
        elif (
            isinstance(message, LoadProgressed) and message.instance.state is InstanceState.LOADING
        ):
            message.instance.progress = message.progress
            self.context.signals.changed(wake_reaper=False)

    async def _retire(self, instance: Instance) -> None:
        """Unload a failed instance; a pinned version is loaded again at once."""
        await self._lifecycle.retire(instance)
        if self.residency.is_pinned(instance.model_id) and not self.context.closing:
            self._restore(instance.record)

    # -- reading ------------------------------------------------------------------

    def instances(self) -> list[InstanceSnapshot]:
        return self.residency.snapshots()

    def instance(self, model_id: str) -> InstanceSnapshot | None:
        """The version's first replica (or an instance key's own snapshot), if resident."""
        return self.residency.first_snapshot(model_id)

    def leaks(self) -> list[Leak]:
        return list(self.residency.leaks)

    def failures(self) -> list[Failure]:
        """The latest failure of every version that had one, newest first."""
        return self.residency.failure_list()

    def is_pinned(self, model_id: str) -> bool:
        return self.residency.is_pinned(model_id)

    def ledger(self, *, fresh: bool = True) -> list[LedgerRow]:
        """The memory ledger now (``fresh``: read NVML and the kernel first)."""
        return self.residency.ledger(fresh=fresh)

    def devices(self) -> list[DeviceSnapshot]:
        return self.residency.device_snapshots()

    def host_tier(self) -> TierSnapshot:
        """The host-RAM tier: its budget, what it holds, and whose weights rest there."""
        return self.residency.tier_snapshot()

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting per version: for a lease (a load) or in a batch queue."""
        return self.admission.depths(list(self.residency.instances.values()))

    async def task_of(self, record: VersionRecord) -> Task | None:
        """What ``record`` does, without loading it (None: only a load can tell)."""
        return await self._tasks.task_of(record)

    # -- requests ---------------------------------------------------------------

    def lease(
        self,
        record: VersionRecord,
        *,
        keep_alive: float | None = None,
        client_gone: ClientGone | None = None,
    ) -> LeaseHold:
        """Hold a READY instance of ``record`` for the whole ``async with`` body.

        ``keep_alive`` (a request's own) replaces the instance's from now on. When
        ``max_queue`` requests already wait for the version, 429 (``QueueFull``).
        ``client_gone``: returns once the client has left; a request that has to wait
        (for a load, a wake-up) gives up then (``ClientClosed``), and a load nobody
        else waits for is cancelled.
        """
        return LeaseHold(self, record, keep_alive, client_gone)

    async def _take_lease(
        self, record: VersionRecord, client_gone: ClientGone | None
    ) -> tuple[Lease, float]:
        """Entering a lease (``LeaseHold``): the instance, and when it was acquired."""
        clock = self.context.clock
        self.admission.admit(
            record, self.residency.version_replicas(record), self.context.settings, clock.now()
        )
        started = clock.now()
        instance, waited = await self._ready_instance(
            record, device=None, why="request", client_gone=client_gone
        )
        acquired = clock.now()
        instance.acquire(acquired)
        self.residency.history.used(record.model_id, instance.device)
        cold_start_ms = (acquired - started) * 1000 if waited else None
        return Lease(instance=instance, cold_start_ms=cold_start_ms), acquired

    def _give_back(self, lease: Lease, acquired: float, keep_alive: float | None) -> None:
        """Leaving a lease (``LeaseHold``): release the instance, learn its service time."""
        instance = lease.instance
        if keep_alive is not None:
            instance.keep_alive = keep_alive
        released = self.context.clock.now()
        self.admission.served(instance.record.model_id, released - acquired)
        instance.release(released)
        self.context.signals.changed(
            wake_reaper=not instance.in_flight and self._reaper.expires_before_look(instance)
        )

    async def _ready_instance(
        self,
        record: VersionRecord,
        *,
        device: str | None,
        why: str,
        reprofile: bool = False,
        client_gone: ClientGone | None = None,
    ) -> tuple[Instance, bool]:
        """A READY instance, and whether this call had to wait for it.

        While a request waits, it counts as demand on its version (admission): a
        freshly loaded instance is not idle, and so not evictable, until the
        requests that waited for it have taken their leases. Without this, two
        loads competing for the same room evict each other's fresh instances before
        either serves anything.
        """
        chosen = self._ready_now(record)
        if chosen is not None:
            return chosen, False  # the common case: no wait, so no demand to count
        self.admission.start_waiting(record.model_id)
        self.context.signals.changed(wake_reaper=False)  # a queue grew (observers)
        waiting = self._wait_ready(record, device=device, why=why, reprofile=reprofile)
        try:
            if client_gone is None:
                return await waiting
            return await unless_gone(waiting, client_gone, record.model_id)
        finally:
            self.admission.stop_waiting(record.model_id)

    def _ready_now(self, record: VersionRecord) -> Instance | None:
        """The READY replica the routing policy picks for ``record`` now, or None.

        Picking one may start another replica when every one is busy
        (``max_replicas``); a daemon shutting down answers 503 instead.
        """
        if self.context.closing:
            raise Draining("routerd is shutting down", retry_after=5)
        replicas = self.residency.version_replicas(record)
        chosen = self._replicas.route(record, replicas)
        if chosen is not None and options_of(record).several:
            self._scale_up_if_busy(record, replicas)  # only versions that may have several
        return chosen

    async def _wait_ready(
        self, record: VersionRecord, *, device: str | None, why: str, reprofile: bool = False
    ) -> tuple[Instance, bool]:
        """Wait until ``_ready_now`` has an instance: for a drain, a wake-up or a load."""
        while True:
            chosen = self._ready_now(record)
            if chosen is not None:
                return chosen, True
            instance = self.residency.get(record.model_id)
            if instance is not None and instance.state in (
                InstanceState.DRAINING,
                InstanceState.OFFLOADING,
                InstanceState.UNLOADING,
            ):
                await instance.vacated.wait()  # gone, or in the host tier (woken below)
                # Still leaving: it was asleep (vacated) and is unloading from there. An
                # unloading one too, or this loop would spin without ever yielding.
                leaving = instance.state in (InstanceState.DRAINING, InstanceState.UNLOADING)
                if leaving and not instance.gone.is_set():
                    await instance.gone.wait()
                continue
            if instance is not None and instance.state.resting:
                wake = functools.partial(self._swap.wake, instance)
                await self._single_flight(instance.key, wake, "waking")
                continue
            load = functools.partial(self._swap.load, record, device, why, reprofile=reprofile)
            await self._single_flight(record.model_id, load, "loading", cancellable=True)

    async def _single_flight(
        self, key: str, start: _Start, doing: str, *, cancellable: bool = False
    ) -> Instance:
        """Join the load (or wake-up) of ``key`` in flight, or start it.

        A waiter gives up after ``load_timeout`` (503 with Retry-After); the load
        carries on for the others and for that waiter's retry. A waiter cancelled (its
        client gone) leaves too; when it was the last, a ``cancellable`` load is
        cancelled (``Swap.load`` gives its reservation back once its thread returned).
        A wake-up is never cancelled: it would cost the instance its place in the host
        tier.
        """
        task = self._loads.get(key)
        if task is None:
            task = self._start_load(key, start, name=f"{doing} {key}")
        self._waiters[key] = self._waiters.get(key, 0) + 1
        cancelled = False
        try:
            return await self.context.clock.wait_for(
                asyncio.shield(task), self.settings.load_timeout
            )
        except TimeoutError:
            model_id = key.split("#")[0]
            raise Unavailable(
                f"{model_id} is still {doing} after {self.settings.load_timeout:.0f}s",
                retry_after=5,
            ) from None
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            left = self._waiters.pop(key) - 1
            if left:
                self._waiters[key] = left
            elif cancelled and cancellable and not task.done() and self._loads.get(key) is task:
                log.info("cancelling the load of %s: nobody waits for it any more", key)
                task.cancel()

    def _start_load(self, key: str, start: _Start, *, name: str) -> asyncio.Task[Instance]:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
        task = asyncio.create_task(start(), name=name)
        self._loads[key] = task
        task.add_done_callback(self._load_done)
        return task

    def _load_done(self, task: asyncio.Task[Instance]) -> None:
        for key, known in list(self._loads.items()):
            if known is task:
                del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters that gave up must not leave it unseen
        self.context.signals.changed()

    # -- replicas -----------------------------------------------------------------

    def _scale_up_if_busy(self, record: VersionRecord, replicas: list[Instance]) -> None:
        """Start another replica's load when ``Replicas.to_add`` says one is due.

        Only where memory allows without evicting anything (the swap refuses the
        rest), and never twice for the same replica.
        """
        replica = self._replicas.to_add(record, replicas)
        if replica is None:
            return
        key = f"{record.model_id}#{replica}" if replica else record.model_id
        if key in self._loads:
            return  # that replica is on its way (estimating, before it has an instance)
        task = self._start_load(
            key,
            functools.partial(self._swap.load, record, None, "scale-up", replica=replica),
            name=f"replica {key}",
        )
        self.context.background.spawn(self._add_replica(record, replica, task), name=f"add {key}")

    async def _add_replica(
        self, record: VersionRecord, replica: int, task: asyncio.Task[Instance]
    ) -> None:
        try:
            await task
        except Unavailable as exc:
            log.info("%s: not adding replica %d: %s", record.model_id, replica, exc.message)

    # -- operators --------------------------------------------------------------

    async def load(self, record: VersionRecord, **options: Any) -> InstanceSnapshot:
        """``load_or_find``'s snapshot alone (rollouts, routes, tests)."""
        return (await self.load_or_find(record, **options))[0]

    async def load_or_find(
        self,
        record: VersionRecord,
        *,
        device: str | None = None,
        why: str = "manual",
        reprofile: bool = False,
    ) -> tuple[InstanceSnapshot, bool]:
        """Make ``record`` resident (on ``device`` if given), or find it resident, and
        whether it was ready already: its snapshot then tells of an earlier load, and an
        operator must not take that for this call's (joining a load in flight is a load).
        ``reprofile``: measure its footprint anew (``Planner.known``); that needs a load
        of its own, so a version resident or loading is a ``Conflict``: evict it first."""
        busy = self.residency.replicas(record.model_id) or record.model_id in self._loads
        if reprofile and busy:
            raise Conflict(
                f"{record.model_id} is loaded or loading; evict it first to load it "
                "with a new profile",
                param="reprofile",
            )
        instance, waited = await self._ready_instance(
            record, device=device, why=why, reprofile=reprofile
        )
        return self.residency.snapshot(instance), not waited

    async def evict(
        self, model_id: str, *, reason: str = "manual", force: bool = False
    ) -> InstanceSnapshot:
        """Drain (no new leases; live ones finish) and unload every replica of ``model_id``.

        ``force`` ends live requests at once, each with a clear error. Returns the
        first replica as it was before it left.
        """
        replicas = sorted(self.residency.replicas(model_id), key=lambda i: i.replica)
        if not replicas:
            raise NotFound(f"{model_id} is not loaded", param="model")
        snapshots = await asyncio.gather(
            *(self._evict_replica(i, reason=reason, force=force) for i in replicas)
        )
        return snapshots[0]

    async def _evict_replica(
        self, instance: Instance, *, reason: str, force: bool
    ) -> InstanceSnapshot:
        if instance.state.loading:
            task = self._loads.get(instance.key)
            if task is not None:
                await asyncio.wait([task])
            if self.residency.get(instance.key) is not instance:
                return self.residency.snapshot(instance)
        snapshot = self.residency.snapshot(instance)
        if instance.state is not InstanceState.READY and not instance.state.resting:
            # Already leaving: wait until it is gone, or until it rests in the host
            # tier (then it leaves the tier too, below).
            if force:
                instance.revoke(f"{instance.model_id} was evicted by an operator")
            await instance.vacated.wait()
            if not instance.state.resting:
                await instance.gone.wait()
                return snapshot
        await self._lifecycle.evict(instance, reason=reason, trigger=None, force=force)
        return snapshot

    def evict_later(self, model_id: str, *, reason: str) -> None:
        """Drain and unload ``model_id`` in the background (e.g. a reload changed it)."""
        self.context.background.spawn(self.evict(model_id, reason=reason), name=f"evict {model_id}")

    def pin(self, record: VersionRecord) -> None:
        """Never evict this version (operators may still evict it by hand)."""
        self.context.store.set_pinned(record.name, record.version, True)
        self.residency.pinned.add(record.model_id)
        self.context.signals.changed()

    def unpin(self, record: VersionRecord) -> None:
        self.context.store.set_pinned(record.name, record.version, False)
        self.residency.pinned.discard(record.model_id)
        self.context.signals.changed()


class LeaseHold:
    """``Scheduler.lease`` as an ``async with``: a class rather than a generator-based
    context manager, because every request enters one and a generator costs each of
    them a frame, a generator object and two extra awaits."""

    __slots__ = ("_acquired", "_client_gone", "_keep_alive", "_lease", "_record", "_scheduler")

    def __init__(
        self,
        scheduler: Scheduler,
        record: VersionRecord,
        keep_alive: float | None,
        client_gone: ClientGone | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._record = record
        self._keep_alive = keep_alive
        self._client_gone = client_gone
        self._lease: Lease | None = None
        self._acquired = 0.0

    async def __aenter__(self) -> Lease:
        if self._lease is not None:
            raise RuntimeError("a lease is entered once")
        self._lease, self._acquired = await self._scheduler._take_lease(
            self._record, self._client_gone
        )
        return self._lease

    async def __aexit__(self, *exc_info: object) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self._scheduler._give_back(lease, self._acquired, self._keep_alive)
