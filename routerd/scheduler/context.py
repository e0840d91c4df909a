"""What every part of the scheduler shares: its clock, its settings, and three small
services — change signals, the event journal and background tasks — and the loop
that keeps the device readings fresh.

The parts (admission, residency, planning, lifecycle) are given one ``Context`` by
the coordinator that owns them; none of them reaches into another's state through
it. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from backends.registry import BackendRegistry
from policies.placement import PlacementPolicy
from routerd.clock import Clock
from routerd.devices import DeviceInventory
from routerd.scheduler.settings import SchedulerObserver, SchedulerSettings
from state import Store, StoreError, VersionRecord

log = logging.getLogger("routerd.scheduler")


class Signals:
    """ "Something changed": wakes whoever waits for room, and the keep-alive reaper.

    A wait is a bare future and a timer on the scheduler's clock rather than
    ``asyncio.wait_for``: it runs often, and wait_for would create a task each time.
    """

    def __init__(self, clock: Clock, on_change: Callable[[], None] | None = None) -> None:
        self._clock = clock
        self._on_change = on_change  # e.g. metrics, or a test asserting the ledger
        self._waiters: list[asyncio.Future[None]] = []
        self._reaper_waiters: list[asyncio.Future[None]] = []

    def changed(self, *, wake_reaper: bool = True) -> None:
        """Wake everything waiting for a change, and the reaper unless told it need not look."""
        if self._waiters or (wake_reaper and self._reaper_waiters):  # else: no lists made
            waiters, self._waiters = self._waiters, []
            if wake_reaper:
                waiters += self._reaper_waiters
                self._reaper_waiters = []
            for waiter in waiters:
                _resolve(waiter)
        if self._on_change is not None:
            self._on_change()

    async def next_change(self) -> None:
        """Return at the next ``changed``, however long that takes (observers, tests)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    async def wait(self, timeout: float, *, reaper: bool = False) -> None:
        """Return at the next ``changed`` or after ``timeout``, whichever comes first."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._reaper_waiters if reaper else self._waiters
        waiters.append(waiter)
        timer = self._clock.call_later(timeout, lambda: _resolve(waiter))
        try:
            await waiter
        finally:
            timer.cancel()
            if waiter in waiters:  # timed out: do not keep it until a change
                waiters.remove(waiter)


class Journal:
    """The event log (SQLite) and whoever observes it (metrics).

    An event the database cannot take now (locked by another process) is kept and
    written with the next one, so no event is lost and no load fails for want of its
    log line. Observers see each event at once.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self.observer: SchedulerObserver | None = None
        self.unrecorded: list[tuple[str, VersionRecord, dict[str, Any]]] = []

    def record(self, kind: str, record: VersionRecord, **fields: Any) -> None:
        self.unrecorded.append((kind, record, fields))
        self.flush()
        if self.observer is not None:
            self.observer.event(kind, record, fields)

    def flush(self) -> None:
        while self.unrecorded:
            kind, record, fields = self.unrecorded[0]
            try:
                self._store.record_event(kind, record.name, record.version, **fields)
            except StoreError as exc:
                log.warning("event log not written yet (%d waiting): %s", len(self.unrecorded), exc)
                return
            self.unrecorded.pop(0)


class Background:
    """Tasks the scheduler starts and must see finished (evictions, retirements)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed: %s", name, t.exception())

        task.add_done_callback(done)

    async def finish(self) -> None:
        """Wait for every spawned task, including ones spawned while waiting."""
        while self.tasks:
            await asyncio.wait(list(self.tasks))


@dataclass
class Context:
    """The scheduler's shared parts; ``settings`` and ``placement`` change on reload."""

    backends: BackendRegistry
    devices: DeviceInventory
    store: Store
    placement: PlacementPolicy
    settings: SchedulerSettings
    clock: Clock
    signals: Signals
    journal: Journal
    background: Background = field(default_factory=Background)
    pid: int = field(default_factory=os.getpid)
    closing: bool = False


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def poll_devices(context: Context) -> None:
    """Refresh the device readings that status pages show, every ``poll_interval``, and
    write the events kept while the database was locked; until the scheduler closes."""
    while not context.closing:
        try:
            await asyncio.to_thread(context.devices.readings)
        except Exception as exc:  # a flaky NVML read must not stop polling
            log.warning("reading devices failed: %s", exc)
        context.journal.flush()
        await context.clock.sleep(context.settings.poll_interval)
