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
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from routerd.simulate.costs import ModelCost
from routerd.simulate.hardware import SIMULATED_PID, SimulatedBackend, SimulatedGpus
from routerd.simulate.loop import LoopTimeClock, VirtualTimeLoop
from routerd.simulate.report import Outcome, PolicyResult, summarize
from routerd.simulate.trace import TraceRequest, split_model
from state import Store, VersionRecord, VersionSpec

log = logging.getLogger("routerd.simulate")

BELADY = "belady"
"""The reference run's name: Belady's rule (``policies.eviction.FurthestNextUse``)."""

START = 1000.0  # virtual seconds at which the trace's t = 0 falls
WALL_START = 1_700_000_000.0  # wall time the stored events of a simulation count from
_MEMINFO = "MemTotal: 0 kB\nMemAvailable: 0 kB\n"  # no CPU device: cpu_budget is 0


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
    *,
    store_dir: Path | None = None,
) -> PolicyResult:
    """Replay ``trace`` with eviction ``policy``: a registered name, ``belady``, or a
    policy object (one not registered, a test's).

    ``store_dir``: where the run's SQLite store goes (a temporary folder when None)."""
    missing = sorted({r.model for r in trace} - set(costs))
    if missing:
        raise ValueError(f"the model table has no entry for {', '.join(missing)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="routerd-sim-", dir=_fast_tmp()) as tmp:
        folder = store_dir or Path(tmp)
        loop = VirtualTimeLoop(START)
        try:
            result = loop.run_until_complete(_run(loop, trace, costs, host, policy, folder))
        finally:
            loop.close()
    return replace(result, wall_seconds=round(time.perf_counter() - started, 3))


async def _run(
    loop: VirtualTimeLoop,
    trace: Sequence[TraceRequest],
    costs: Mapping[str, ModelCost],
    host: Host,
    policy: str | EvictionPolicy,
    folder: Path,
) -> PolicyResult:
    clock = LoopTimeClock(loop, WALL_START)
    store = Store.open(folder / "simulation.db", clock=clock.wall)
    try:
        records = _register(store, costs, host)
        versions = {(r.name, r.version): costs[model] for model, r in records.items()}
        gpus = SimulatedGpus([host.memory] * host.gpus)
        backend = SimulatedBackend(loop, gpus, versions, host_tier=host.host_cache > 0)
        meminfo = folder / "meminfo"
        meminfo.write_text(_MEMINFO)
        eviction = _eviction(policy, trace, records)
        scheduler = Scheduler(
            BackendRegistry({"simulated": lambda: backend}),
            DeviceInventory(gpus, meminfo=meminfo, cpu_budget=0),
            store,
            policy_registry.create("placement", host.placement, eviction=eviction),
            replace(host.settings, host_cache=host.host_cache, check_invariants=False),
            clock=clock,
            our_pid=SIMULATED_PID,
        )
        await scheduler.start(lambda model_id: None)
        outcomes = await _replay(scheduler, trace, records, costs)
        ended = loop.time()
        await scheduler.close()
        events = store.events(limit=1 << 62)
    finally:
        store.close()
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


async def _replay(
    scheduler: Scheduler,
    trace: Iterable[TraceRequest],
    records: Mapping[str, VersionRecord],
    costs: Mapping[str, ModelCost],
) -> list[Outcome]:
    """Every request at its time; returns their outcomes in arrival order."""

    def serve_s(request: TraceRequest) -> float:
        return costs[request.model].serve_s(request.completion_tokens)

    loop = asyncio.get_running_loop()
    outcomes: list[Outcome | None] = []
    running: set[asyncio.Task[None]] = set()
    for request in trace:
        delay = START + request.t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(
            _request(scheduler, records[request.model], serve_s(request), outcomes, len(outcomes))
        )
        outcomes.append(None)
        running.add(task)
        task.add_done_callback(running.discard)
    while running:
        await asyncio.wait(list(running))
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


def _fast_tmp() -> str | None:
    """Memory-backed /dev/shm for the run's store where there is one: no disk flushes."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
