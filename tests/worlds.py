"""Whole small worlds run through the real scheduler on virtual time, every step checked.

A ``World`` is one or two small fake GPUs (and, optionally, a host tier), models of
given sizes whose loads and unloads take given virtual time and fail in given ways,
requests arriving at given times, and operators evicting now and then. ``run_world``
builds the daemon's parts around it (``tests.support.fake_services``, so the
scheduler asserts the ledger's invariant after every change), lives it to the end,
and checks it. tests/test_ledger_invariant.py draws worlds with hypothesis and
keeps the ones that once broke the invariant.

Why an event loop of its own: the scheduler runs backend calls on instance threads,
whose timing no test controls. ``VirtualWorkLoop`` runs them on the loop instead,
each taking virtual time, so a world is one exact, repeatable interleaving and
hypothesis can replay and shrink a failure. The scheduler's code is untouched: it
awaits a future that resolves later, as it would with a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.base import Footprint, LoadSpec
from backends.registry import BackendRegistry
from contract.errors import BackendError, ModelCrashed, OutOfMemory
from contract.generation import ModelInfo, SamplingParams, Task
from routerd.clock import VirtualClock
from routerd.devices import DeviceInventory
from routerd.errors import NotFound, RouterdError
from routerd.instance import InstanceSnapshot
from routerd.scheduler import Scheduler
from routerd.scheduler.settings import DeviceSnapshot, Leak
from routerd.services import Services
from routerd.simulate.loop import InlineWorkLoop
from tests.fakes import MEMINFO, FakeGpus
from tests.support import CHECKED_SCHEDULERS, fake_services, fake_spec

PID = os.getpid() + 100_000  # the scheduler's, given to it: no walk of /proc for children
SHM = "/dev/shm"  # the store's file, where there is one: no disk flushes per event
BOUND_S = 600.0  # virtual seconds a world gets for each phase (its requests need ~100)
LIVELOCK_TURNS = 100_000
REAL_S = 30  # real seconds a world may take (they take milliseconds): past it, a hang
SETTINGS = {"load_timeout": 60.0, "release_timeout": 2.0, "stop_timeout": 1.0}


# -- time -------------------------------------------------------------------------------


class VirtualWorkLoop(InlineWorkLoop):
    """The simulator's ``InlineWorkLoop`` with its work timed on the world's
    ``VirtualClock`` (which ``drive`` advances) rather than on the loop's own time."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def _after(self, seconds: float, callback: Callable[[], None]) -> None:
        self.clock.call_later(seconds, callback)


class DryClock(VirtualClock):
    """``VirtualClock`` that, before each timer and after it, lets the loop run until
    nothing is ready rather than for a fixed number of turns: every chain of zero-time
    wake-ups completes before time moves (however long), and a quiet loop costs one
    turn, not 64 — most of a world's wall time otherwise. (It reads ``VirtualClock``'s
    timer heap: a test clock extending a test clock.)"""

    async def advance(self, seconds: float) -> None:
        target = self._now + seconds
        await run_dry()
        while (due := self.next_deadline()) is not None and due <= target:
            _, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, timer.when)
            timer.callback()
            await run_dry()
        self._now = max(self._now, target)


async def run_dry() -> None:
    """Yield until no callback is ready: every task that can run without time passing
    has run. A loop that never runs dry is a livelock (a hang), and fails."""
    ready = asyncio.get_running_loop()._ready  # type: ignore[attr-defined]
    for _ in range(LIVELOCK_TURNS):
        await asyncio.sleep(0)
        if not ready:
            return
    raise AssertionError(f"the loop kept running for {LIVELOCK_TURNS} turns without time")


async def drive(clock: VirtualClock, done: Callable[[], bool], limit: float = BOUND_S) -> bool:
    """Jump from timer to timer until ``done`` or ``limit`` virtual seconds; whether done.
    Timers that keep firing without time moving are a livelock (a hang), and fail."""
    end = clock.now() + limit
    await run_dry()
    still = 0
    while not done():
        due = clock.next_deadline()
        if due is None or due > end:
            return False
        still = still + 1 if due <= clock.now() else 0
        if still > LIVELOCK_TURNS // 100:
            raise AssertionError(f"timers keep firing at {clock.now()} without time moving")
        await clock.advance(due - clock.now())
    return True


# -- the world ------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    size: int  # what the backend really takes (and measures)
    estimate: int = 0  # what it says before loading (0: its size; below it: an overrun)
    load_s: float = 0.5
    unload_s: float = 0.0  # past release_timeout: a failed instance's unload hangs, then ends
    fail_loads: int = 0  # its first loads fail (a missing file)
    oom_loads: int = 0  # then this many run out of memory
    leaks: bool = False  # unloading never gives the memory back
    device: str | None = None  # its placement preference, if any
    sleeps: bool = False  # it can sleep: weights to the host tier, a fifth stays
    offloads: bool = False  # it can offload: weights (four fifths) to the host tier, all leaves

    @property
    def estimated(self) -> int:
        return self.estimate or self.size

    @property
    def overruns(self) -> int:
        return max(self.size - self.estimated, 0)

    @property
    def working(self) -> int:
        """What stays on the device while it sleeps (and what is not weights)."""
        return self.size // 5

    @property
    def weights(self) -> int:
        return self.size - self.working


@dataclass(frozen=True)
class Request:
    model: int
    at: float
    hold: float = 0.0
    crash: bool = False  # its generation crashes the model (ModelCrashed)


@dataclass(frozen=True)
class World:
    gpus: tuple[int, ...]
    models: tuple[Model, ...]
    requests: tuple[Request, ...]
    evictions: tuple[tuple[float, int, bool], ...] = ()  # (at, model, force)
    scheduler: Mapping[str, Any] = field(default_factory=dict)  # SchedulerConfig fields
    host: int = 0  # the host tier's budget (host_cache, and the CPU device's); 0: none


# -- the fake backend -------------------------------------------------------------------


class TimedModel:
    """A loaded model that holds its bytes on a fake GPU; generating crashes it."""

    def __init__(self, spec: LoadSpec, model: Model, backend: TimedBackend) -> None:
        self.spec = spec
        self.model = model
        self.backend = backend
        self.info = ModelInfo(Task.GENERATE, 64, spec.device, "float32", inline=True)
        self.asleep = False
        self.offloaded = False

    def warm_up(self) -> None:
        self.backend.loop.takes(0.5)

    def measure_footprint(self) -> Footprint:
        if self.model.sleeps or self.model.offloads:
            return Footprint(
                weights=self.model.size - self.model.working, working=self.model.working
            )
        return Footprint(weights=self.model.size)

    def generate_batch(self, rows: Sequence[Any], admit: Any, max_rows: int | None) -> None:
        raise ModelCrashed("the fake device fell off the bus")

    def unload(self) -> None:
        on_gpu = self.model.working if self.asleep else self.model.size
        if self.offloaded:
            on_gpu = 0
        on_host = self.model.weights if self.asleep or self.offloaded else 0
        if self.model.leaks:
            gpu = int(self.spec.device.split(":")[1])

            def keep() -> None:
                self.backend.kept[gpu].append(on_gpu)
                self.backend.host_kept += on_host

            self.backend.loop.takes(self.model.unload_s, keep)
            return

        def give_back() -> None:
            self.backend.hold(self.spec, -on_gpu)
            self.backend.host_used -= on_host

        self.backend.loop.takes(self.model.unload_s, give_back)

    # Sleepable, for models that sleep; the scheduler asks ``can_sleep`` first.

    @property
    def can_sleep(self) -> bool:
        return self.model.sleeps

    async def sleep(self) -> None:
        await self.backend.loop.clock.sleep(self.model.load_s / 2)
        moved = self.model.size - self.model.working
        self.backend.hold(self.spec, -moved)
        self.backend.host_used += moved
        self.asleep = True

    async def wake_up(self) -> None:
        await self.backend.loop.clock.sleep(self.model.load_s / 2)
        moved = self.model.size - self.model.working
        self.backend.hold(self.spec, moved)
        self.backend.host_used -= moved
        self.asleep = False

    # Offloadable, for models that offload; the scheduler asks ``can_offload`` first.

    @property
    def can_offload(self) -> bool:
        return self.model.offloads

    def offload(self) -> None:
        if self.model.leaks:  # its device memory never comes back: the offload is not trusted
            self.backend.loop.takes(self.model.load_s / 4)
            return

        def move() -> None:
            self.backend.hold(self.spec, -self.model.size)
            self.backend.host_used += self.model.weights
            self.offloaded = True

        self.backend.loop.takes(self.model.load_s / 4, move)

    def restore(self) -> None:
        def move() -> None:
            self.backend.hold(self.spec, self.model.size)
            self.backend.host_used -= self.model.weights
            self.offloaded = False

        self.backend.loop.takes(self.model.load_s / 4, move)


class TimedBackend:
    """Loads ``TimedModel``s by name (``m0``, ``m1``…), as the world says."""

    kind = "fake"

    def __init__(self, loop: VirtualWorkLoop, gpus: FakeGpus, world: World) -> None:
        self.loop = loop
        self.gpus = gpus
        self.world = world
        self.loads: dict[str, int] = {}
        self.host_used = 0  # weights of sleeping models, in host RAM
        self.kept: list[list[int]] = [[] for _ in world.gpus]  # bytes leaky unloads kept
        self.host_kept = 0  # host RAM leaky unloads of models in the tier kept

    def model(self, name: str) -> Model:
        return self.world.models[int(name[1:])]

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return dict(options)

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task:
        return Task.GENERATE  # as every TimedModel's info says

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        return Footprint(weights=self.model(spec.name).estimated)

    def hold(self, spec: LoadSpec, nbytes: int) -> None:
        self.gpus.add(int(spec.device.split(":")[1]), PID, nbytes)

    def load(self, spec: LoadSpec) -> TimedModel:
        model = self.model(spec.name)
        self.loop.takes(model.load_s)
        n = self.loads[spec.name] = self.loads.get(spec.name, 0) + 1
        if n <= model.fail_loads:
            raise BackendError(f"{spec.name}: no weights in the folder")
        if n <= model.fail_loads + model.oom_loads:
            raise OutOfMemory(f"CUDA out of memory loading {spec.name}")
        self.hold(spec, model.size)  # as it loads: the device holds it from here on
        return TimedModel(spec, model, self)


# -- the checks -------------------------------------------------------------------------


class Watch:
    """The independent check, after every change the scheduler signals: from its
    published snapshots, and from the memory the fake devices really hold. What a
    backend took beyond its grant (an overrun) before its load was made ready, or
    never gave back after, is the backend's doing, and excused; nothing else is."""

    def __init__(self, world: World, backend: TimedBackend, *, strict: bool = True) -> None:
        self.world = world
        self.backend = backend
        self.strict = strict
        self.changes = 0
        self.problems: list[str] = []
        self.outcomes: list[str] = []
        self.asleep: set[str] = set()  # instances that slept and have not woken since
        self.offloaded: set[str] = set()  # instances offloaded and not back since
        self.states: set[str] = set()  # every state an instance was seen in

    def __call__(self, scheduler: Scheduler) -> None:
        self.changes += 1
        instances = scheduler.instances()
        leaks = scheduler.leaks()
        for device in scheduler.devices():
            if device.id == "cpu":
                self._host(device)
            else:
                self._gpu(device, instances, leaks)

    def _gpu(
        self, device: DeviceSnapshot, instances: list[InstanceSnapshot], leaks: list[Leak]
    ) -> None:
        index = int(device.id.split(":")[1])
        total = self.world.gpus[index]
        mine = [i for i in instances if i.device == device.id]
        unready = [i for i in mine if i.load_ms is None and i.state != "waiting"]
        leaked = [x for x in leaks if x.device == device.id]
        kept = sum(x.overrun for x in leaked)
        excused = kept + sum(max((i.measured_bytes or 0) - i.estimated_bytes, 0) for i in unready)
        taken = kept + sum(self.backend.model(i.model).overruns for i in unready)
        held = sum(x.bytes for x in leaked)
        for i in mine:
            key = f"{i.model}#{i.replica}"
            self.states.add(i.state)
            if i.state == "sleeping":
                self.asleep.add(key)
            elif i.state == "offloaded":
                self.offloaded.add(key)
            elif i.state in ("loading", "warming", "ready"):  # woken, or loaded afresh
                self.asleep.discard(key)
                self.offloaded.discard(key)
            if key in self.asleep:  # asleep, or leaving from sleep: its weights are out
                held += self.backend.model(i.model).working
            elif key in self.offloaded:  # offloaded, or leaving from there: nothing held
                pass
            elif i.state != "waiting":
                held += i.bytes
        physical = self.backend.gpus.usage[index].get(PID, 0) - self._unseen(index, leaked)
        books = f"{device.id} after change {self.changes}: {mine} leaks {leaks}"
        if device.capacity_bytes != total:
            self.problems.append(f"capacity {device.capacity_bytes} != {total}: {books}")
        if device.over_budget_bytes > excused:
            self.problems.append(f"published over budget {device}: {books}")
        if held > total + excused:
            self.problems.append(f"instances hold {held} > {total}: {books}")
        if physical > total + taken:
            self.problems.append(f"the GPU holds {physical} > {total}: {books}")

    def _unseen(self, gpu: int, leaked: list[Leak]) -> int:
        """Bytes leaky unloads kept that the scheduler's ledger does not know of — 0 when
        strict. It verifies a release by this process's total on the GPU going down by
        the bytes freed, so another release in the same window makes up for a leak and
        hides it (the kept world ``a leak hidden by another release`` shows this); drawn
        worlds run into that, and excuse it so as to look for everything else."""
        if self.strict:
            return 0
        known = sum(x.bytes for x in leaked if self.backend.model(x.model_id.split("@")[0]).leaks)
        return max(sum(self.backend.kept[gpu]) - known, 0)

    def _host(self, device: DeviceSnapshot) -> None:
        if device.over_budget_bytes > 0:
            self.problems.append(f"published over budget after change {self.changes}: {device}")
        # Host RAM a leaky unload kept is the backend's leak: no reading of the host tier
        # shows it to the scheduler (the memory audit does), so only a strict world fails.
        excused = 0 if self.strict else self.backend.host_kept
        if self.backend.host_used - excused > self.world.host:
            self.problems.append(
                f"host RAM holds {self.backend.host_used} > {self.world.host} "
                f"after change {self.changes}"
            )


# -- living it ---------------------------------------------------------------------------


async def _request(services: Services, clock: VirtualClock, request: Request) -> str:
    """One request: served, or a clear error; anything else fails the world."""
    await clock.sleep(request.at)
    try:
        async with services.scheduler.lease(services.router.resolve(f"m{request.model}")) as lease:
            if request.crash:
                try:
                    await lease.handle.generate([1, 2], SamplingParams(max_tokens=1))
                except ModelCrashed:
                    return "crashed"
            await clock.sleep(request.hold)
    except RouterdError as exc:
        assert exc.message and exc.status >= 400, exc
        return f"error {exc.status}"
    return "served"


async def _evict(scheduler: Scheduler, clock: VirtualClock, at: float, model: int, force: bool):
    await clock.sleep(at)
    with contextlib.suppress(NotFound):  # not resident then
        await scheduler.evict(f"m{model}@1", reason="operator", force=force)


async def _live(services: Services, world: World, clock: VirtualClock, watch: Watch) -> None:
    scheduler = services.scheduler
    await scheduler.start(lambda model_id: None)
    requests = [asyncio.create_task(_request(services, clock, r)) for r in world.requests]
    evictions = [asyncio.create_task(_evict(scheduler, clock, *e)) for e in world.evictions]
    everything = requests + evictions
    finished = await drive(clock, lambda: all(t.done() for t in everything))
    hung = [r for r, t in zip(world.requests, requests, strict=True) if not t.done()]
    assert finished, f"requests still waiting after {BOUND_S:g} virtual seconds: {hung}"
    for task in evictions:
        task.result()
    watch.outcomes = [t.result() for t in requests]  # a request ending otherwise raises

    def settled() -> bool:
        return all(r.reserved == r.claimed == 0 for r in scheduler.ledger(fresh=False))

    # A load whose waiters gave up carries on; it must end too, and leave nothing.
    assert await drive(clock, settled), scheduler.ledger()
    loading = [i for i in scheduler.instances() if i.state in ("waiting", "loading", "warming")]
    assert loading == [], loading

    closing = asyncio.create_task(scheduler.close())
    assert await drive(clock, closing.done), "shutdown hung"
    closing.result()
    await drive(clock, lambda: clock.next_deadline() is None)  # hung unloads end
    assert scheduler.instances() == [], scheduler.instances()
    for row in scheduler.ledger():
        leaked = sum(x.bytes for x in scheduler.leaks() if x.device == row.device)
        assert (row.ours, row.reserved, row.claimed) == (leaked, 0, 0), row


def run_world(world: World, *, strict: bool = True) -> Watch:
    """Build the world, live it on its own loop, and check it; returns what it saw.
    ``strict``: leaks the scheduler could not see fail it too (see ``Watch._unseen``)."""
    clock = DryClock()
    loop = VirtualWorkLoop(clock)
    gpus = FakeGpus(list(world.gpus))
    backend = TimedBackend(loop, gpus, world)
    watch = Watch(world, backend, strict=strict)
    with tempfile.TemporaryDirectory(dir=SHM if os.path.isdir(SHM) else None) as tmp:
        meminfo = Path(tmp) / "meminfo"
        meminfo.write_text(MEMINFO)
        specs = []
        for n, model in enumerate(world.models):
            options = {"batching": "none"}  # a crash runs inline: no batching window
            device = model.device or ("cuda" if world.host else None)  # never on the host
            if device is not None:
                options["device"] = device
            specs.append(fake_spec(Path(tmp), f"m{n}", **options))
        services = fake_services(
            Path(tmp),
            None,  # type: ignore[arg-type]
            specs,
            backends=BackendRegistry({"fake": lambda: backend}),  # type: ignore[dict-item]
            devices=DeviceInventory(gpus, meminfo=meminfo, cpu_budget=world.host),
            devices_config={
                "gpu_headroom": 0,
                "cpu_headroom": 0,
                "poll_interval": 30.0,
                "host_cache": world.host,
            },
            scheduler={**SETTINGS, **world.scheduler},
            clock=clock,
            on_change=watch,
        )
        services.scheduler.context.pid = PID  # as Scheduler(our_pid=PID) would
        breaks = services.scheduler.residency.invariant_breaks
        try:
            with _real_time_limit(REAL_S):
                loop.run_until_complete(_live(services, world, clock, watch))
        finally:
            services.store.close()
            loop.close()
            CHECKED_SCHEDULERS.remove(services.scheduler)  # checked here, world by world
        assert breaks == [], "\n".join(map(str, breaks))
        assert not watch.problems, "\n".join(watch.problems)
    return watch


@contextlib.contextmanager
def _real_time_limit(seconds: int) -> Iterator[None]:
    """Fail a world that runs ``seconds`` of real time. Virtual time bounds every wait,
    but code that loops without yielding stops the clock too: only a signal gets in."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def hung(signum: int, frame: object) -> None:
        raise AssertionError(f"the world ran {seconds} real seconds: the loop is stuck")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
