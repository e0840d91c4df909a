"""routerd's host-RAM tier with fakes: an evicted instance whose model can offload keeps
its weights in the tier (``[devices] host_cache``) and gives its device back, the next
request brings it back without a load, the tier drops its least recently used when
full, and a request that arrives while an instance is offloading waits and then
brings it back."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from backends.base import Footprint, LoadSpec, Offloadable
from routerd.clock import VirtualClock
from routerd.errors import Unavailable
from routerd.services import Services
from state import Event
from tests.fakes import FakeBackend, FakeGpus, FakeModel
from tests.support import LedgerWatch, ask, one_gpu_services, states

GPU = 10_000
WEIGHTS = 4_000
WORKING = 2_000
MODEL = WEIGHTS + WORKING  # two do not fit on the GPU


class OffloadingModel(FakeModel):
    """A FakeModel that can offload: all of it leaves the fake GPU, its weights wait in
    the fake host's memory until ``restore`` puts them back."""

    def __init__(self, spec: LoadSpec, backend: OffloadingBackend) -> None:
        super().__init__(spec, backend)
        self.tiered = backend
        self.offloads = 0
        self.restores = 0
        self.offloaded = False
        self.threads: list[threading.Thread] = []

    @property
    def can_offload(self) -> bool:
        return True

    def measure_footprint(self) -> Footprint:
        return Footprint(weights=WEIGHTS, working=WORKING)

    def offload(self) -> None:
        self.threads.append(threading.current_thread())
        self.tiered.offload_gate.wait()
        if self.tiered.fail_offload:
            raise RuntimeError("no pinned memory")
        self.offloads += 1
        self.offloaded = True
        if not self.spec.options.get("leak"):
            self.backend.on_gpu(self.spec, -MODEL)
        self.tiered.host_used += WEIGHTS

    def restore(self) -> None:
        self.threads.append(threading.current_thread())
        self.restores += 1
        self.offloaded = False
        self.backend.on_gpu(self.spec, MODEL)
        self.tiered.host_used -= WEIGHTS

    def unload(self) -> None:
        self.unloaded = True
        self.backend.note(self.backend.unloads, self.spec.name + "@" + self.spec.version)
        if self.offloaded:
            self.tiered.host_used -= WEIGHTS
        elif not self.spec.options.get("leak"):
            self.backend.on_gpu(self.spec, -MODEL)


class OffloadingBackend(FakeBackend):
    def __init__(self, gpus: FakeGpus) -> None:
        super().__init__(gpus)
        self.offload_gate = threading.Event()  # cleared: offloads wait (a slow copy)
        self.offload_gate.set()
        self.fail_offload = False
        self.host_used = 0  # bytes the fake host holds for offloaded weights

    def load(self, spec: LoadSpec) -> OffloadingModel:  # type: ignore[override]
        self.note(self.loads, spec.name + "@" + spec.version)
        model = OffloadingModel(spec, self)
        self.on_gpu(spec, MODEL)
        self.models.append(model)
        return model


def _services(
    tmp: Path,
    host_cache: int,
    watch: LedgerWatch,
    names: tuple[str, ...] = ("a", "b"),
    clock: VirtualClock | None = None,
    scheduler: dict[str, float] | None = None,
    leaky: tuple[str, ...] = (),
) -> tuple[Services, OffloadingBackend]:
    backend = OffloadingBackend(FakeGpus([GPU]))
    services = one_gpu_services(
        tmp,
        backend,
        size=MODEL,
        host_cache=host_cache,
        watch=watch,
        names=names,
        leaky=leaky,
        clock=clock,
        scheduler=scheduler,
    )
    return services, backend


def _moves(services: Services) -> list[tuple[str, str, str | None]]:
    """(kind, model, where) of every load and eviction, oldest first: ``where`` is a
    load's ``source`` or an eviction's ``tier``."""
    events: list[Event] = list(reversed(services.store.events(limit=50)))
    return [
        (e.kind, e.model, (e.detail or {}).get("source") or (e.detail or {}).get("tier"))
        for e in events
        if e.kind in ("load", "evict")
    ]


def _tier_bytes(services: Services) -> int:
    return {r.device: r for r in services.scheduler.ledger()}["cpu"].tier


async def test_a_victim_is_offloaded_and_comes_back_without_a_load(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=10_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")  # no room for both: a goes to the host tier
        assert states(services) == {"a": "offloaded", "b": "ready"}
        first = backend.models[0]
        assert isinstance(first, OffloadingModel) and isinstance(first, Offloadable)
        assert first.offloads == 1 and backend.unloads == []
        assert _tier_bytes(services) == WEIGHTS  # counted in the tier's own budget
        rows = {r.device: r for r in services.scheduler.ledger()}
        assert rows["cuda:0"].ours == MODEL and rows["cpu"].ours == 0
        snapshot = services.scheduler.instance("a@1")
        assert snapshot is not None and snapshot.tier == "host"
        assert snapshot.host_bytes == WEIGHTS

        await ask(services, "a")  # back from the tier; b goes there to make room
        assert states(services) == {"a": "ready", "b": "offloaded"}
        assert first.restores == 1 and backend.loads == ["a@1", "b@1"]
        assert _moves(services) == [
            ("load", "a", "disk"),
            ("evict", "a", "host"),
            ("load", "b", "disk"),
            ("evict", "b", "host"),
            ("load", "a", "host"),
        ]
        # The offload ran on the instance's thread, and the thread was let go: the
        # restore ran on a new one.
        assert len(first.threads) == 2 and first.threads[0] is not first.threads[1]
        assert watch.worst_over == 0
    finally:
        await services.scheduler.close()
        services.store.close()
    assert sorted(backend.unloads) == ["a@1", "b@1"]  # the offloaded one too, at shutdown
    assert backend.host_used == 0
    assert not services.scheduler.leaks()


async def test_a_full_tier_drops_its_least_recently_used(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(
        tmp_path, host_cache=WEIGHTS + WEIGHTS // 2, watch=watch, names=("a", "b", "c")
    )
    try:
        await ask(services, "a")
        await ask(services, "b")  # a to the tier
        await ask(services, "c")  # b to the tier, which drops a (gone) to make room
        assert states(services) == {"b": "offloaded", "c": "ready"}
        assert backend.unloads == ["a@1"]
        assert _tier_bytes(services) == WEIGHTS
        dropped = next(e for e in services.store.events(model="a") if e.kind == "evict")
        assert dropped.reason == "host-tier-full" and dropped.trigger == "b@1"
        assert dropped.detail is not None and dropped.detail["tier"] == "gone"
        assert dropped.detail["host_bytes"] == WEIGHTS
        await ask(services, "a")  # from disk again; c to the tier, dropping b
        assert backend.loads == ["a@1", "b@1", "c@1", "a@1"]
        assert states(services) == {"a": "ready", "c": "offloaded"}
        assert watch.worst_over == 0
    finally:
        await services.scheduler.close()
        services.store.close()
    assert backend.host_used == 0


async def test_without_a_tier_a_victim_is_unloaded(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=0, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")
        assert states(services) == {"b": "ready"}
        assert backend.unloads == ["a@1"]
        assert backend.models[0].offloads == 0  # type: ignore[attr-defined]
        assert _moves(services)[1] == ("evict", "a", "gone")
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_request_during_the_offload_waits_then_brings_it_back(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=10_000, watch=watch)
    try:
        await ask(services, "a")
        backend.offload_gate.clear()  # a's offload will hold until released
        wants_b = asyncio.create_task(ask(services, "b"))
        while states(services).get("a") != "offloading":
            await services.scheduler.context.signals.wait(1.0)
        wants_a = asyncio.create_task(ask(services, "a"))
        await asyncio.sleep(0)
        assert not wants_a.done()  # it waits for the offload to finish
        backend.offload_gate.set()
        await asyncio.wait_for(asyncio.gather(wants_b, wants_a), 10)
        assert states(services) == {"a": "ready", "b": "offloaded"}
        assert backend.loads == ["a@1", "b@1"]  # a came back from the tier, not from disk
        assert watch.worst_over == 0
    finally:
        backend.offload_gate.set()
        await services.scheduler.close()
        services.store.close()


async def test_an_offload_that_fails_unloads_the_instance(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=10_000, watch=watch)
    try:
        await ask(services, "a")
        backend.fail_offload = True
        await ask(services, "b")
        assert states(services) == {"b": "ready"}
        assert backend.unloads == ["a@1"]
        assert _tier_bytes(services) == 0  # the claim on the tier was given back
        assert not services.scheduler.leaks()
        assert watch.worst_over == 0
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_an_offload_that_keeps_device_memory_is_undone(tmp_path: Path) -> None:
    """The device must show the instance's bytes back after an offload; one that keeps
    them is not trusted: the instance is unloaded, and what still does not come back is
    a leak that stays in the ledger."""
    clock = VirtualClock()
    watch = LedgerWatch()
    services, _backend = _services(
        tmp_path,
        host_cache=10_000,
        watch=watch,
        clock=clock,
        leaky=("a",),
        scheduler={"release_timeout": 1, "load_wait_timeout": 5},
    )
    try:
        await ask(services, "a")
        wants_b = asyncio.create_task(ask(services, "b"))
        for _ in range(100):  # virtual time, until b gives up: a's bytes never come back
            if wants_b.done():
                break
            await clock.advance(0.5)
        assert states(services).get("a") is None
        assert [leak.model_id for leak in services.scheduler.leaks()] == ["a@1"]
        assert _tier_bytes(services) == 0
        assert watch.worst_over == 0
        try:
            await wants_b
        except Unavailable:
            pass
        else:
            raise AssertionError("b cannot fit beside a's leaked bytes")
    finally:
        await asyncio.wait_for(services.scheduler.close(), 10)
        services.store.close()


async def test_an_operator_eviction_drops_an_offloaded_instance(tmp_path: Path) -> None:
    watch = LedgerWatch()
    services, backend = _services(tmp_path, host_cache=10_000, watch=watch)
    try:
        await ask(services, "a")
        await ask(services, "b")
        assert states(services)["a"] == "offloaded"
        await services.scheduler.evict("a@1")
        assert states(services) == {"b": "ready"}
        assert backend.unloads == ["a@1"] and backend.host_used == 0
        assert _tier_bytes(services) == 0
        await services.scheduler.evict("b@1")  # an operator's eviction skips the tier
        assert states(services) == {} and backend.unloads == ["a@1", "b@1"]
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_an_idle_instance_expires_into_the_tier(tmp_path: Path) -> None:
    clock = VirtualClock()
    watch = LedgerWatch()
    services, backend = _services(
        tmp_path, host_cache=10_000, watch=watch, clock=clock, scheduler={"keep_alive": 5}
    )
    await services.scheduler.start(services.router.table.versions.get)
    try:
        await ask(services, "a")
        for _ in range(20):
            if states(services).get("a") == "offloaded":
                break
            await clock.advance(1)
        assert states(services) == {"a": "offloaded"}
        assert _moves(services)[-1] == ("evict", "a", "host")
        await ask(services, "a")
        assert backend.loads == ["a@1"] and states(services) == {"a": "ready"}
    finally:
        await asyncio.wait_for(services.scheduler.close(), 10)
        services.store.close()
