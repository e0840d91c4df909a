"""The host-RAM tier for engines that sleep, with fakes: eviction under pressure puts a
sleep-capable instance to sleep (weights to host RAM) when the tier (``host_cache``)
has room, the tier counts its weights, the next request wakes it without a load, and
the eviction policy prefers it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from backends.base import LoadSpec, Sleepable
from policies.eviction import LeastRecentlyUsed
from policies.types import Resident
from routerd.clock import VirtualClock
from routerd.services import Services
from tests.fakes import FakeBackend, FakeGpus, FakeModel
from tests.support import LedgerWatch, ask, one_gpu_services, states

GPU = 10_000
MODEL = 6_000  # two do not fit on the GPU
WORKING = 500  # what stays on the GPU while asleep


class SleepyModel(FakeModel):
    """A FakeModel that can sleep: its weights leave the fake GPU, the rest stays."""

    def __init__(self, spec: LoadSpec, backend: SleepyBackend) -> None:
        super().__init__(spec, backend)
        self.sleeps = 0
        self.wakes = 0
        self.fail_wake = False
        self.asleep = False

    @property
    def can_sleep(self) -> bool:
        return True

    def measure_footprint(self):  # type: ignore[no-untyped-def]
        from backends.base import Footprint

        return Footprint(weights=MODEL - WORKING, working=WORKING)

    async def sleep(self) -> None:
        await asyncio.sleep(0)
        self.sleeps += 1
        self.asleep = True
        self.backend.on_gpu(self.spec, -(MODEL - WORKING))

    async def wake_up(self) -> None:
        await asyncio.sleep(0)
        if self.fail_wake:
            raise RuntimeError("wake failed")
        self.wakes += 1
        self.asleep = False
        self.backend.on_gpu(self.spec, MODEL - WORKING)

    def unload(self) -> None:
        self.unloaded = True
        self.backend.unloads.append(self.spec.name + "@" + self.spec.version)
        if not self.spec.options.get("leak"):
            self.backend.on_gpu(self.spec, -(WORKING if self.asleep else MODEL))


class SleepyBackend(FakeBackend):
    def load(self, spec: LoadSpec) -> SleepyModel:  # type: ignore[override]
        self.loads.append(spec.name + "@" + spec.version)
        model = SleepyModel(spec, self)
        self.on_gpu(spec, MODEL)
        self.models.append(model)
        return model


def _services(
    tmp: Path,
    host_cache: int,
    watch: LedgerWatch,
    leaky: tuple[str, ...] = (),
    scheduler: dict[str, float] | None = None,
) -> tuple[Services, SleepyBackend]:
    backend = SleepyBackend(FakeGpus([GPU]))
    services = one_gpu_services(
        tmp,
        backend,
        size=MODEL,
        host_cache=host_cache,
        watch=watch,
        leaky=leaky,
        clock=VirtualClock(),
        scheduler=scheduler,
    )
    return services, backend


async def test_a_victim_sleeps_then_wakes_on_its_next_request(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=100_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")  # no room for both: a sleeps instead of unloading
        assert states(services) == {"a": "sleeping", "b": "ready"}
        assert backend.unloads == []
        sleeper = backend.models[0]
        assert isinstance(sleeper, SleepyModel) and isinstance(sleeper, Sleepable)
        assert sleeper.sleeps == 1
        rows = {r.device: r for r in services.scheduler.ledger()}
        assert rows["cpu"].tier == MODEL - WORKING  # a's weights, in the host tier
        assert rows["cpu"].ours == 0  # which has its own budget
        assert rows["cuda:0"].ours == MODEL + WORKING  # b, and what a keeps there

        await ask(services, "a")  # wakes a (b goes to sleep for it), no second load
        assert states(services) == {"a": "ready", "b": "sleeping"}
        assert sleeper.wakes == 1 and backend.loads == ["a@1", "b@1"]
        events = list(reversed(services.store.events(limit=20)))
        moves = [
            (e.kind, (e.detail or {}).get("tier") or (e.detail or {}).get("source")) for e in events
        ]
        assert moves == [
            ("load", "disk"),
            ("evict", "sleep"),
            ("load", "disk"),
            ("evict", "sleep"),
            ("load", "sleep"),
        ]
        # Each moved the weights: what left the GPU, and what came back.
        moved = [e.bytes for e, (_, where) in zip(events, moves, strict=True) if where == "sleep"]
        assert moved == [MODEL - WORKING] * 3
        assert watch.worst_over == 0
    finally:
        await services.scheduler.close()
        services.store.close()
    assert sorted(backend.unloads) == ["a@1", "b@1"]
    assert not services.scheduler.leaks()  # sleeping ones unload at shutdown


async def test_without_host_room_the_victim_is_unloaded(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=1_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")
        assert states(services) == {"b": "ready"}
        assert backend.unloads == ["a@1"]
        assert backend.models[0].sleeps == 0  # type: ignore[attr-defined]
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_failed_wake_unloads_it_and_answers_clearly(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=100_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")
        sleeper = backend.models[0]
        assert isinstance(sleeper, SleepyModel)
        sleeper.fail_wake = True
        from routerd.errors import LoadFailed

        try:
            await ask(services, "a")
        except LoadFailed as exc:
            assert "waking a@1 failed" in str(exc)
        else:
            raise AssertionError("waking should have failed")
        assert states(services) == {"b": "sleeping"}  # b made room for a's wake
        assert "a@1" in backend.unloads
        rows = {r.device: r for r in services.scheduler.ledger()}
        assert rows["cpu"].tier == MODEL - WORKING  # b's weights only
        assert rows["cuda:0"].ours == WORKING
        assert not services.scheduler.leaks()
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_wake_up_waits_for_memory_its_victim_never_gives_back(tmp_path: Path) -> None:
    """a sleeps for b; a's next request evicts b (the host has no room for b's weights
    too), but b's memory never comes back. The wake-up must not allocate on top of it:
    it waits for room as a load does, then gives up with a clear 503, never over."""
    from routerd.errors import Unavailable

    watch = LedgerWatch()
    services, backend = _services(
        tmp_path,
        host_cache=MODEL,  # a's weights fit the tier; b's would not as well
        watch=watch,
        leaky=("b",),
        scheduler={"release_timeout": 2, "load_wait_timeout": 3},
    )
    clock = services.scheduler.context.clock
    assert isinstance(clock, VirtualClock)
    try:
        await ask(services, "a")
        await ask(services, "b")
        assert states(services) == {"a": "sleeping", "b": "ready"}
        waking = asyncio.create_task(ask(services, "a"))
        for _ in range(40):  # virtual time, half a second at a time, until it gives up
            if waking.done():
                break
            await clock.advance(0.5)
        assert waking.done(), "the wake-up neither woke nor gave up"
        try:
            await waking
        except Unavailable as exc:
            assert "could not wake" in exc.message
        else:
            raise AssertionError("a wake-up without room should have failed")
        assert [leak.model_id for leak in services.scheduler.leaks()] == ["b@1"]
        assert backend.models[0].wakes == 0  # type: ignore[attr-defined]
        assert watch.worst_over == 0
        assert not services.scheduler.instances()  # a was discarded, b leaked
    finally:
        # Real seconds, only to bound a broken scheduler: its shutdown may wait forever
        # on an instance a broken wake-up left behind.
        await asyncio.wait_for(services.scheduler.close(), 10)
        services.store.close()


def test_lru_prefers_victims_that_only_sleep() -> None:
    def resident(name: str, last_used: float, sleeps: bool) -> Resident:
        return Resident(
            model_id=name,
            device="cuda:0",
            bytes=100,
            last_used=last_used,
            loaded_at=0.0,
            in_flight=0,
            pinned=False,
            ready=True,
            sleeps=sleeps,
        )

    residents = [resident("old", 1.0, False), resident("sleepy", 5.0, True)]
    policy = LeastRecentlyUsed()
    assert policy.victims(residents, need=100, free=0, now=10.0, min_residency=0.0) == ("sleepy",)
    plain = [resident("old", 1.0, False), resident("new", 5.0, False)]
    assert policy.victims(plain, need=100, free=0, now=10.0, min_residency=0.0) == ("old",)


async def test_an_operator_eviction_unloads_a_sleeping_instance(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=100_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")
        assert states(services)["a"] == "sleeping"
        await services.scheduler.evict("a@1")
        assert states(services) == {"b": "ready"}
        assert backend.unloads == ["a@1"]
        rows = {r.device: r for r in services.scheduler.ledger()}
        assert rows["cpu"].tier == 0 and rows["cuda:0"].ours == MODEL
        assert not services.scheduler.leaks()
    finally:
        await services.scheduler.close()
        services.store.close()
