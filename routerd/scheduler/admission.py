"""Admission: who waits for a version, and who is turned away with 429.

It counts the requests waiting per version (for a load, a wake-up or a drain) and
learns, per version, how long a request holds its lease and how long a load takes.
A request that finds ``max_queue`` already waiting is refused with ``QueueFull``,
whose ``Retry-After`` is ``retry_after`` over what was learned: the rest of a load
in progress plus the time the requests ahead need, spread over the requests the
version serves at once. That arithmetic is pure, so it is tested without a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from routerd.errors import ClientClosed, QueueFull
from routerd.instance import Instance
from routerd.scheduler.settings import SchedulerSettings
from routerd.states import InstanceState
from routerd.version_options import options_of
from state import VersionRecord

T = TypeVar("T")

ALPHA = 0.2
"""Weight of the newest sample in the moving averages: recent enough to follow a
change of load, smooth enough that one slow request does not swing Retry-After."""

MIN_RETRY_S = 1.0
MAX_RETRY_S = 600.0


def moving_average(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + ALPHA * (sample - previous)


@dataclass(frozen=True)
class QueueState:
    """What the scheduler knows about a version when its queue is full."""

    waiting: int  # requests ahead of this one
    service_s: float | None  # moving average of how long a request holds its lease
    concurrent: int  # requests it serves at once now (leases held on ready replicas)
    load_s: float | None = None  # how long its last load took; None: never measured
    loading_for_s: float | None = None  # a load is in progress since this long; None: none


def retry_after(state: QueueState) -> float:
    """Seconds until the queue has likely drained enough to take one more request."""
    seconds = 0.0
    if state.loading_for_s is not None:
        expected = state.load_s if state.load_s is not None else MIN_RETRY_S
        seconds += max(expected - state.loading_for_s, 0.0)
    if state.service_s is not None:
        seconds += state.waiting * state.service_s / max(state.concurrent, 1)
    return min(max(seconds, MIN_RETRY_S), MAX_RETRY_S)


class Admission:
    """Waiting counts and service statistics per version (keyed by model id)."""

    def __init__(self) -> None:
        self.waiting: dict[str, int] = {}  # model id → requests waiting for it
        self._service_s: dict[str, float] = {}  # model id → moving average of lease time
        self._load_s: dict[str, float] = {}  # model id → how long its last load took

    def admit(
        self,
        record: VersionRecord,
        replicas: list[Instance],
        settings: SchedulerSettings,
        now: float,
    ) -> None:
        """Refuse (429) when ``max_queue`` requests already wait for ``record``."""
        own = options_of(record).max_queue
        limit = settings.max_queue if own is None else own
        if limit <= 0:
            return
        key = record.model_id
        waiting = self.waiting.get(key, 0)
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
            loading_for_s=(now - loading[0].placed_at) if loading else None,
        )
        raise QueueFull(
            f"{key} already has {waiting} requests waiting (max_queue {limit}); retry later",
            retry_after=retry_after(state),
        )

    def start_waiting(self, model_id: str) -> None:
        """A request waits for its version: it counts as demand until ``stop_waiting``."""
        self.waiting[model_id] = self.waiting.get(model_id, 0) + 1

    def stop_waiting(self, model_id: str) -> None:
        self.waiting[model_id] -= 1
        if not self.waiting[model_id]:
            del self.waiting[model_id]

    def served(self, model_id: str, seconds: float) -> None:
        """A lease was held ``seconds``: learn the version's service time."""
        self._service_s[model_id] = moving_average(self._service_s.get(model_id), seconds)

    def loaded(self, model_id: str, seconds: float) -> None:
        """A load of the version took ``seconds``."""
        self._load_s[model_id] = seconds

    def depths(self, instances: list[Instance]) -> dict[str, int]:
        """Requests waiting per version: for a lease (a load) or in a batch queue."""
        depths = dict(self.waiting)
        for instance in instances:
            if instance.queued:
                key = instance.model_id
                depths[key] = depths.get(key, 0) + instance.queued
        return depths


ClientGone = Callable[[], Awaitable[None]]
"""Returns once a request's client has left (the web layer watches its connection)."""


async def unless_gone(waiting: Coroutine[Any, Any, T], client_gone: ClientGone, model_id: str) -> T:
    """``waiting``, given up once ``client_gone`` returns: the wait is cancelled (so
    the load it joined loses a waiter) and the request ends with ``ClientClosed``."""
    task = asyncio.ensure_future(waiting)
    watch = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
        raise ClientClosed(f"the client left while waiting for {model_id}")
    return task.result()
