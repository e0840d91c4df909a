"""One loaded model on one device, and the thread that does its blocking work.

Every instance gets its own single-thread executor (DESIGN.md rule 6): loading,
warm-up, forward passes and unloading all run there, one at a time, so a model
that is loading never blocks the event loop or another model's requests.

Only the scheduler's lifecycle creates instances and moves their ``state``
(``move_to``, checked against ``routerd.states.TRANSITIONS``); handlers see them
through a lease. An instance reports failures and load progress as messages
(``routerd.messages``) and never calls into the scheduler.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from backends.base import (
    MOVING_TO_DEVICE,
    READING_WEIGHTS,
    WARMING_UP,
    Footprint,
    LoadedModel,
    LoadProgress,
)
from contract.errors import LoadCancelled
from contract.generation import Cancellation
from routerd.instance_handle import InstanceHandle
from routerd.messages import InstanceFailed, LoadProgressed, Post
from routerd.states import INITIAL, InstanceState, check_transition
from state import VersionRecord

if TYPE_CHECKING:
    from routerd.batcher import Batcher

T = TypeVar("T")
_Part = TypeVar("_Part")


class Instance:
    """A version resident (or becoming resident) on a device."""

    def __init__(
        self,
        record: VersionRecord,
        device: str,
        *,
        reserved_bytes: int,
        estimated_bytes: int,
        keep_alive: float,
        now: float,
        wall: Callable[[], float] = time.time,
        replica: int = 0,
    ) -> None:
        self.record = record
        self.replica = replica
        self.device = device
        # Read on every request, so a plain attribute rather than a property; only
        # ``move_to`` assigns it (tests/test_scheduler_layout.py checks the source).
        self.state: InstanceState = INITIAL
        self._wall = wall
        self.reserved_bytes = reserved_bytes  # what placement planned for it
        self.estimated_bytes = estimated_bytes  # the estimate from headers
        self.measured: Footprint | None = None
        self.profile_known = False  # its load trusted a footprint measured before
        self.keep_alive = keep_alive
        self.in_flight = 0
        self.placed_at = now  # scheduler clock
        self.loaded_at = now  # scheduler clock; reset when it becomes ready
        self.touched = now  # scheduler clock: last lease acquired or released
        self.load_ms: float | None = None
        self.last_used = wall()  # wall clock, for people
        self.victim_of: str | None = None  # the load this instance makes room for
        self.revoked: str | None = None  # why live leases were ended (forced eviction)
        # Set from the instance thread while loading (one atomic assignment), read on the loop.
        self.progress: LoadProgress | None = None
        self.load_cancelled = False  # nobody waits for its load any more (``cancel_load``)
        self._cancellations: set[Cancellation] = set()
        self.stop_timeout = 30.0  # cancelled work must stop this soon, or the instance is hung
        self.max_failures = 3  # consecutive backend failures before the instance is failed
        self.failures = 0  # consecutive backend failures so far
        self.post: Post | None = None  # where health and progress go (set by the scheduler)
        self._model: LoadedModel | None = None
        self._inline = False  # the attached model's ``info.inline``, read once per load
        self._batcher: Batcher | None = None
        self._executor: ThreadPoolExecutor | None = None  # started by the first ``run``
        self.idle = asyncio.Event()
        self.idle.set()
        self.gone = asyncio.Event()
        # Set when the instance stops holding its device bytes: gone, or asleep.
        self.vacated = asyncio.Event()
        self.host_bytes = 0  # host RAM its weights hold in the tier (asleep or offloaded)
        self.tier: str | None = None  # "sleep" or "host" while its weights are in the tier
        self.handle = InstanceHandle(self)  # what a lease hands to serving

    def move_to(self, target: InstanceState) -> None:
        """Enter ``target``; only the scheduler's lifecycle calls this (rule 1)."""
        check_transition(self.key, self.state, target)
        self.state = target

    @property
    def kept_bytes(self) -> int:
        """Bytes that stay on its device while its weights are in the host tier: an
        engine asleep keeps its working memory; an offloaded instance keeps nothing."""
        if self.tier == "sleep" and self.measured is not None:
            return self.measured.working
        return 0

    @property
    def wake_bytes(self) -> int:
        """Bytes that coming back from the host tier brings to its device: all but what
        stayed there (0 for an instance that is not in the tier)."""
        if self.tier is not None:
            return self.bytes - self.kept_bytes
        return 0

    @property
    def device_bytes(self) -> int:
        """Bytes held on its device now: all of them, or what stays there while its
        weights are in the host tier (until it starts coming back)."""
        if self.tier is not None and self.state not in (
            InstanceState.WAITING,
            InstanceState.LOADING,
        ):
            return self.kept_bytes
        return self.bytes

    @property
    def bytes(self) -> int:
        """Measured bytes once ready; the planned reservation before that."""
        return self.measured.total if self.measured is not None else self.reserved_bytes

    @property
    def model_id(self) -> str:
        return self.record.model_id

    @property
    def key(self) -> str:
        """Unique per instance: the model id for the first replica, ``id#n`` for others."""
        return (
            self.record.model_id if self.replica == 0 else f"{self.record.model_id}#{self.replica}"
        )

    @property
    def model(self) -> LoadedModel:
        return self._attached(self._model, "loaded model")

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The model if one is attached (no error when not)."""
        return self._model

    @property
    def batcher(self) -> Batcher:
        """The queue every request of this instance goes through (set once ready)."""
        return self._attached(self._batcher, "batcher")

    def _attached(self, part: _Part | None, what: str) -> _Part:
        """``part`` of an instance that has it; asking one that has not is a bug in the
        caller (the scheduler hands out instances only once they are ready)."""
        if part is None:
            raise RuntimeError(f"{self.model_id} has no {what} (state {self.state})")
        return part

    @property
    def queued(self) -> int:
        return 0 if self._batcher is None else self._batcher.queued

    def attach(self, model: LoadedModel) -> None:
        self._model = model
        self._inline = model.info.inline

    def attach_batcher(self, batcher: Batcher) -> None:
        self._batcher = batcher

    def detach_batcher(self) -> Batcher | None:
        batcher, self._batcher = self._batcher, None
        return batcher

    def detach(self) -> LoadedModel | None:
        model, self._model = self._model, None
        self._inline = False
        return model

    async def run(self, fn: Callable[..., T], /, *args: object) -> T:
        """Run blocking ``fn(*args)`` on this instance's own thread (started again if
        ``close_executor`` stopped it: an instance back from the host tier)."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], /, *args: object) -> asyncio.Future[T]:
        """``run`` as a future, without a coroutine around it: for a caller that would
        otherwise wrap ``run`` in a task of its own (the lifecycle's loading steps)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"routerd-{self.record.model_id}-{self.replica}",
            )
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def call(self, fn: Callable[..., T], /, *args: object) -> T:
        """Make a request-path call to the loaded model (encode, generate, embed).

        On the instance thread, unless the model says its calls never block
        (``ModelInfo.inline``): then on the loop, where a thread hop would cost more
        than the call itself.
        """
        if self._inline:
            return fn(*args)
        return await self.run(fn, *args)

    def cancel_load(self) -> None:
        """Its load is no longer wanted: the backend's next progress report stops it."""
        self.load_cancelled = True

    def report_progress(self, progress: LoadProgress) -> None:
        """A backend's ``LoadSpec.progress`` (instance thread): post it to the scheduler,
        or raise ``LoadCancelled`` into the backend's load when it is no longer wanted."""
        if self.load_cancelled:
            raise LoadCancelled(f"the load of {self.model_id} was cancelled: nobody waits for it")
        if self.post is not None:
            self.post(LoadProgressed(self, progress))

    def acquire(self, now: float) -> None:
        self.in_flight += 1
        self.touched = now
        self.idle.clear()

    def release(self, now: float) -> None:
        self.in_flight -= 1
        self.touched = now
        self.last_used = self._wall()
        if self.in_flight == 0:
            self.idle.set()

    def track(self, cancellation: Cancellation) -> None:
        """Remember a running generation so a forced eviction can stop it."""
        self._cancellations.add(cancellation)
        if self.revoked is not None:
            cancellation.cancel()

    def untrack(self, cancellation: Cancellation) -> None:
        self._cancellations.discard(cancellation)

    def revoke(self, reason: str) -> None:
        """End every live lease's work (forced eviction); handlers report ``reason``."""
        self.revoked = reason
        for cancellation in list(self._cancellations):
            cancellation.cancel()

    def report_success(self) -> None:
        """A request ended without a backend fault: the failure streak is over."""
        self.failures = 0

    def report_failure(self, reason: str, *, fatal: bool = False) -> None:
        """A backend fault served a request (or the thread hung: ``fatal``).

        After ``max_failures`` in a row, or at once when fatal, the scheduler is told
        (an ``InstanceFailed`` message); it alone decides what becomes of the instance
        (DESIGN.md rule 1).
        """
        self.failures += 1
        if (fatal or self.failures >= self.max_failures) and self.post is not None:
            self.post(InstanceFailed(self, reason))

    def close_executor(self) -> None:
        """Stop the thread once its queued work is done; never blocks the loop."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)


@dataclass(frozen=True)
class InstanceSnapshot:
    """What status pages and routerctl see of an instance; copied, never live."""

    model: str
    version: str
    replica: int
    backend: str
    device: str
    state: str
    bytes: int
    estimated_bytes: int
    measured_bytes: int | None
    in_flight: int
    pinned: bool
    last_used: float
    load_ms: float | None
    expires_at: float | None  # wall clock; None while busy, pinned or kept forever
    queued: int = 0  # requests in its batch queue, not yet running
    progress: LoadProgress | None = None  # while loading: the backend's latest phase
    load_percent: int | None = None  # while loading: an overall estimate, 0..99
    tier: str | None = None  # "sleep" or "host" while its weights wait in the host tier
    host_bytes: int = 0  # what they hold there

    @classmethod
    def of(
        cls, instance: Instance, *, pinned: bool = False, now: float = 0.0, wall: float = 0.0
    ) -> InstanceSnapshot:
        """``now`` on the scheduler's clock, ``wall`` the wall-clock time it stands for."""
        expires_at = None
        if (
            instance.state is InstanceState.READY
            and instance.in_flight == 0
            and not pinned
            and math.isfinite(instance.keep_alive)
        ):
            remaining = instance.touched + instance.keep_alive - now
            expires_at = wall + max(remaining, 0.0)
        return cls(
            model=instance.record.name,
            version=instance.record.version,
            replica=instance.replica,
            backend=instance.record.backend,
            device=instance.device,
            state=str(instance.state),
            bytes=instance.bytes,
            estimated_bytes=instance.estimated_bytes,
            measured_bytes=None if instance.measured is None else instance.measured.total,
            in_flight=instance.in_flight,
            pinned=pinned,
            last_used=instance.last_used,
            load_ms=instance.load_ms,
            expires_at=expires_at,
            queued=instance.queued,
            progress=instance.progress if instance.state.loading else None,
            load_percent=load_percent(instance) if instance.state.loading else None,
            tier=instance.tier,
            host_bytes=instance.host_bytes,
        )


# Share of a whole load each phase accounts for, by where it starts and ends (percent).
_PHASE_SPAN = {READING_WEIGHTS: (0, 60), MOVING_TO_DEVICE: (60, 90), WARMING_UP: (90, 99)}


def load_percent(instance: Instance) -> int:
    """How far a load has come, 0..99: the phase's span, scaled by its bytes done."""
    if instance.state is InstanceState.WAITING:
        return 0
    if instance.state is InstanceState.WARMING:
        return _PHASE_SPAN[WARMING_UP][0]
    progress = instance.progress
    if progress is None or progress.phase not in _PHASE_SPAN:
        return 0
    start, end = _PHASE_SPAN[progress.phase]
    if progress.total_bytes <= 0:
        return start
    share = min(progress.done_bytes / progress.total_bytes, 1.0)
    return int(start + (end - start) * share)
