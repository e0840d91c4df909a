"""One replay of a trace through the daemon's own scheduler, on virtual time.

``simulate`` builds what the daemon builds — the ``Scheduler`` (coordinator,
admission, residency, planning, lifecycle, keep-alive reaper) with the placement
and eviction policies named in config, a SQLite store for its event log and
footprints — over simulated GPUs and the simulated backend
(``routerd.simulate.hardware``), on a ``VirtualTimeLoop``. Each request of the
trace arrives at its time, takes a lease as a daemon request does, holds it while
its model generates, and gives it back. Nothing of the scheduler is re-implemented:
what it decides here is what it decides in the daemon.

The result is summed up from the store's events and the requests' outcomes by
``routerd.simulate.report.summarize``, which reads a daemon's records the same way.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from backends.registry import BackendRegistry
from policies import registry as policy_registry
from policies.eviction import EvictionPolicy, FurthestNextUse
from routerd.config import Config
from routerd.devices import DeviceInventory
from routerd.errors import RouterdError
from routerd.scheduler import Scheduler, SchedulerSettings
from routerd.scheduler.context import Journal
from routerd.simulate.costs import ModelCost
from routerd.simulate.hardware import SIMULATED_PID, SimulatedBackend, SimulatedGpus
from routerd.simulate.loop import LoopTimeClock, VirtualTimeLoop
from routerd.simulate.report import Outcome, PolicyResult, summarize
from routerd.simulate.trace import TraceRequest, split_model
from state import Event, Store, VersionRecord, VersionSpec

log = logging.getLogger("routerd.simulate")

BELADY = "belady"
"""The reference run's name: Belady's rule (``policies.eviction.FurthestNextUse``)."""

START = 1000.0  # virtual seconds at which the trace's t = 0 falls
WALL_START = 1_700_000_000.0  # wall time the stored events of a simulation count from


@dataclass(frozen=True)
class Host:
    """The simulated host: ``gpus`` GPUs of ``memory`` bytes each, a host-RAM tier of
    ``host_cache`` bytes (0: none), and the scheduler's settings from config."""

    memory: int
    settings: SchedulerSettings
    placement: str = "best-fit"
    gpus: int = 1
    host_cache: int = 0
    # Per model (as the trace names it): the scheduler's options of its version
    # (keep_alive, replicas, max_queue…) where a daemon's store gave them.
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    thrash_window: float = 60.0


def host_from_config(
    config: Config,
    memory: int,
    *,
    gpus: int = 1,
    host_cache: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    thrash_window: float = 60.0,
) -> Host:
    """The host ``config`` describes (its scheduler settings, placement and GPU
    headroom; its host tier unless ``host_cache`` is given), with ``gpus`` GPUs of
    ``memory`` bytes."""
    if memory <= 0:
        raise ValueError("the simulated GPUs' memory must be more than 0")
    if gpus < 1:
        raise ValueError("a simulated host needs at least one GPU")
    settings = SchedulerSettings.from_config(config.scheduler, config.devices)
    return Host(
        memory=memory,
        settings=replace(settings, headroom={"cuda": config.devices.gpu_headroom}),
        placement=config.scheduler.placement,
        gpus=gpus,
        host_cache=config.devices.host_cache if host_cache is None else host_cache,
        options=options or {},
        thrash_window=thrash_window,
    )


def simulate(
    trace: Sequence[TraceRequest],
    costs: Mapping[str, ModelCost],
    host: Host,
    policy: str | EvictionPolicy,
) -> PolicyResult:
    """Replay ``trace`` with eviction ``policy``: a registered name, ``belady``, or a
    policy object (one not registered, a test's)."""
    missing = sorted({r.model for r in trace} - set(costs))
    if missing:
        raise ValueError(f"the model table has no entry for {', '.join(missing)}")
    started = time.perf_counter()
    loop = VirtualTimeLoop(START)
    try:
        with _few_collections(), _scheduler_log_quiet():
            result = loop.run_until_complete(_run(loop, trace, costs, host, policy))
    finally:
        loop.close()
    return replace(result, wall_seconds=round(time.perf_counter() - started, 3))


async def _run(
    loop: VirtualTimeLoop,
    trace: Sequence[TraceRequest],
    costs: Mapping[str, ModelCost],
    host: Host,
    policy: str | EvictionPolicy,
) -> PolicyResult:
    clock = LoopTimeClock(loop, WALL_START)
    store = Store.open(Path(":memory:"), clock=clock.wall, scratch=True)
    journal = EventList(store, clock.wall)
    try:
        records = _register(store, costs, host)
        versions = {(r.name, r.version): costs[model] for model, r in records.items()}
        gpus = SimulatedGpus([host.memory] * host.gpus)
        backend = SimulatedBackend(loop, gpus, versions, host_tier=host.host_cache > 0)
        eviction = _eviction(policy, trace, records)
        scheduler = Scheduler(
            BackendRegistry({"simulated": lambda: backend}),
            DeviceInventory(gpus, meminfo=Path(os.devnull), cpu_budget=0),
            store,
            policy_registry.create("placement", host.placement, eviction=eviction),
            replace(host.settings, host_cache=host.host_cache, check_invariants=False),
            clock=clock,
            our_pid=SIMULATED_PID,
            journal=journal,
        )
        await scheduler.start(lambda model_id: None)
        outcomes = await _replay(scheduler, trace, records, costs)
        ended = loop.time()
        await scheduler.close()
    finally:
        store.close()
    events = journal.events
    result = summarize(eviction.name, events, outcomes, thrash_window=host.thrash_window)
    return replace(result, virtual_seconds=round(ended - START, 3))


def _register(store: Store, costs: Mapping[str, ModelCost], host: Host) -> dict[str, VersionRecord]:
    """A stored version per model of the table, placed on the simulated GPUs."""
    records = {}
    for model in costs:
        name, version = split_model(model)
        options = {**host.options.get(model, {}), "device": "cuda"}
        options.pop("devices", None)
        spec = VersionSpec(name, version, "simulated", f"/simulated/{name}/{version}", options)
        records[model] = store.upsert_version(spec, source="config")
    return records


def _eviction(
    policy: str | EvictionPolicy,
    trace: Sequence[TraceRequest],
    records: Mapping[str, VersionRecord],
) -> EvictionPolicy:
    if not isinstance(policy, str):
        return policy
    if policy != BELADY:
        evict: EvictionPolicy = policy_registry.create("eviction", policy)
        return evict
    return FurthestNextUse(next_use_in(trace, records))


def next_use_in(
    trace: Sequence[TraceRequest], records: Mapping[str, VersionRecord]
) -> Callable[[str, float], float]:
    """``next_use(model_id, now)`` over the whole trace: the virtual time of the model's
    next request at or after ``now`` (``inf``: none). Replicas (``id#n``) share theirs."""
    arrivals: dict[str, list[float]] = {}
    for request in trace:
        arrivals.setdefault(records[request.model].model_id, []).append(START + request.t)

    def next_use(model_id: str, now: float) -> float:
        times = arrivals.get(model_id.partition("#")[0], [])
        i = bisect.bisect_left(times, now)
        return times[i] if i < len(times) else math.inf

    return next_use


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """Python's cycle collector, set to run seldom while a simulation runs: it makes
    millions of short-lived objects, and the collector would otherwise walk them, and
    everything imported before, thousands of times (a tenth of the run's time)."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@contextlib.contextmanager
def _scheduler_log_quiet() -> Iterator[None]:
    """The scheduler's warnings are about virtual time (thrash between two simulated
    models, say): the report says what they would; only errors are let through."""
    scheduler_log = logging.getLogger("routerd.scheduler")
    level = scheduler_log.level
    scheduler_log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        scheduler_log.setLevel(level)


ARRIVALS_AHEAD = 64
"""Requests given a timer at once; the first of each batch sets the next batch's.
(All of them at once would make the loop's timer heap as long as the trace, and
every timer cost a log of it in comparisons made in Python.)"""


async def _replay(
    scheduler: Scheduler,
    trace: Sequence[TraceRequest],
    records: Mapping[str, VersionRecord],
    costs: Mapping[str, ModelCost],
) -> list[Outcome]:
    """Every request at its time, each on a timer of its own; returns their outcomes
    in arrival order."""
    loop = asyncio.get_running_loop()
    outcomes: list[Outcome | None] = [None] * len(trace)
    running: set[asyncio.Task[None]] = set()
    finished = loop.create_future()
    left = len(trace)

    def set_timers(first: int) -> None:
        for index in range(first, min(first + ARRIVALS_AHEAD, len(trace))):
            loop.call_at(START + trace[index].t, arrive, index)

    def arrive(index: int) -> None:
        if index % ARRIVALS_AHEAD == 0:
            set_timers(index + ARRIVALS_AHEAD)
        request = trace[index]
        serve_s = costs[request.model].serve_s(request.completion_tokens)
        task = loop.create_task(
            _request(scheduler, records[request.model], serve_s, outcomes, index)
        )
        running.add(task)
        task.add_done_callback(done)

    def done(task: asyncio.Task[None]) -> None:
        nonlocal left
        running.discard(task)
        left -= 1
        if not left:
            finished.set_result(None)

    if left:
        set_timers(0)
        await finished
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


async def _request(
    scheduler: Scheduler,
    record: VersionRecord,
    serve_s: float,
    outcomes: list[Outcome | None],
    index: int,
) -> None:
    """One request: a lease as a daemon request takes it, held while its model
    generates (the time an engine that batches continuously takes for it)."""
    try:
        async with scheduler.lease(record) as lease:
            await asyncio.sleep(serve_s)
    except RouterdError as exc:
        outcomes[index] = Outcome(exc.status, None)
        return
    outcomes[index] = Outcome(200, lease.cold_start_ms)


class EventList(Journal):
    """The simulation's event log: ``Event`` records kept in a list, as the daemon's
    store would return them (the daemon writes each to SQLite as it happens; a
    simulation makes tens of thousands, and reads them all back once)."""

    def __init__(self, store: Store, wall: Callable[[], float]) -> None:
        super().__init__(store)
        self.events: list[Event] = []
        self._wall = wall

    def record(self, kind: str, record: VersionRecord, **fields: Any) -> None:
        detail = fields.get("detail")
        self.events.append(
            Event(
                id=len(self.events) + 1,
                ts=self._wall(),
                kind=kind,
                model=record.name,
                version=record.version,
                device=fields.get("device"),
                reason=fields.get("reason"),
                detail=dict(detail) if detail else {},
                bytes=fields.get("bytes"),
                duration_ms=fields.get("duration_ms"),
                trigger=fields.get("trigger"),
            )
        )
        if self.observer is not None:
            self.observer.event(kind, record, fields)

    def flush(self) -> None:
        """Nothing is ever left unwritten."""
