"""Lifecycle on the virtual clock: the exact states each instance takes, in order.

Every move signals a change, so an ``on_change`` hook that notes each instance's
state sees its whole life; these tests compare it with the path of a swap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from routerd.clock import VirtualClock
from routerd.devices import DeviceInventory
from routerd.errors import LoadFailed
from routerd.instance import Instance
from routerd.scheduler import Scheduler
from routerd.services import Services
from tests.fakes import MEMINFO, FakeBackend
from tests.support import ask, fake_services, fake_spec, until

LOAD = ["waiting", "loading", "warming", "ready"]
LEAVE = ["draining", "unloading", "gone"]


class StateLog:
    """An on_change hook: every state each instance object went through, in order."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[Instance, list[str]]] = {}

    def __call__(self, scheduler: Scheduler) -> None:
        for instance in [*scheduler.residency.instances.values(), *scheduler.residency.retiring]:
            self.seen.setdefault(id(instance), (instance, []))
        for instance, states in self.seen.values():
            if not states or states[-1] != instance.state:
                states.append(str(instance.state))

    def lives(self, key: str) -> list[list[str]]:
        """The lives of every instance that had ``key``, oldest first."""
        return [states for instance, states in self.seen.values() if instance.key == key]


def build(tmp_path: Path, backend: FakeBackend, log: StateLog, *specs, budget: int) -> Services:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(None, meminfo=meminfo, cpu_budget=budget)
    return fake_services(
        tmp_path, backend, list(specs), devices=devices, clock=VirtualClock(), on_change=log
    )


async def test_a_load_that_evicts_a_victim(tmp_path: Path) -> None:
    log, backend = StateLog(), FakeBackend()
    services = build(
        tmp_path,
        backend,
        log,
        fake_spec(tmp_path, "a", bytes=60),
        fake_spec(tmp_path, "b", bytes=60),
        budget=100,
    )
    try:
        await services.scheduler.load(services.router.resolve("a"))
        await services.scheduler.load(services.router.resolve("b"))
        assert log.lives("a@1") == [LOAD + LEAVE]
        assert log.lives("b@1") == [LOAD]
    finally:
        services.store.close()


async def test_a_failed_load_and_an_out_of_memory_retry(tmp_path: Path) -> None:
    log, backend = StateLog(), FakeBackend()
    services = build(
        tmp_path,
        backend,
        log,
        fake_spec(tmp_path, "broken", bytes=10, fail_load="corrupt"),
        fake_spec(tmp_path, "flaky", bytes=40, oom_loads=1),
        budget=100,
    )
    try:
        with pytest.raises(LoadFailed):
            await services.scheduler.load(services.router.resolve("broken"))
        assert log.lives("broken@1") == [["waiting", "loading", "unloading", "gone"]]
        await services.scheduler.load(services.router.resolve("flaky"))
        assert log.lives("flaky@1") == [["waiting", "loading", "unloading", "gone"], LOAD]
    finally:
        services.store.close()


async def test_a_failed_instance_is_retired(tmp_path: Path) -> None:
    log, backend = StateLog(), FakeBackend()
    services = build(tmp_path, backend, log, fake_spec(tmp_path, "a", bytes=10), budget=100)
    scheduler = services.scheduler
    try:
        await scheduler.load(services.router.resolve("a"))
        instance = scheduler.residency.get("a@1")
        assert instance is not None
        instance.report_failure("crashed", fatal=True)
        await until(scheduler, lambda: instance.state == "gone")
        assert log.lives("a@1") == [[*LOAD, "failed", "unloading", "gone"]]
    finally:
        services.store.close()


async def test_an_expired_instance_and_an_operator_eviction(tmp_path: Path) -> None:
    log, backend = StateLog(), FakeBackend()
    services = build(
        tmp_path,
        backend,
        log,
        fake_spec(tmp_path, "short", keep_alive="5s"),
        fake_spec(tmp_path, "kept"),
        budget=10_000,
    )
    scheduler = services.scheduler
    clock = scheduler.context.clock
    assert isinstance(clock, VirtualClock)
    await scheduler.start(services.router.table.versions.get)
    try:
        await scheduler.load(services.router.resolve("short"))
        await scheduler.load(services.router.resolve("kept"))
        await clock.advance(6)
        await until(scheduler, lambda: scheduler.instance("short@1") is None)
        await scheduler.evict("kept@1")
        assert log.lives("short@1") == [LOAD + LEAVE]
        assert log.lives("kept@1") == [LOAD + LEAVE]
        reasons = {e.model: e.reason for e in services.store.events() if e.kind == "evict"}
        assert reasons == {"short": "ttl", "kept": "manual"}
    finally:
        await scheduler.close()
        services.store.close()


async def test_a_victim_that_sleeps_and_wakes(tmp_path: Path) -> None:
    from tests.test_sleep_tier import _services

    log = StateLog()
    services, _ = _services(tmp_path, host_cache=100_000, watch=log)  # type: ignore[arg-type]
    try:
        await ask(services, "a")
        await ask(services, "b")  # a sleeps for b
        await ask(services, "a")  # a wakes; b sleeps for it
        assert log.lives("a@1") == [[*LOAD, "draining", "sleeping", "waiting", "loading", "ready"]]
        assert log.lives("b@1") == [[*LOAD, "draining", "sleeping"]]
    finally:
        await services.scheduler.close()
        services.store.close()
    # shutdown unloads both, the sleeping one too
    assert log.lives("a@1")[0][-4:] == ["ready", *LEAVE]
    assert log.lives("b@1")[0][-4:] == ["sleeping", *LEAVE]
