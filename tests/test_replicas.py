"""Replicas: a fixed count, scale-up under load, scale-down when idle, spread by routing.

On a ``VirtualClock``: requests hold their leases until the test lets them go, so
"busy" is a fact the test sets up, not a race against a sleep.
"""

from __future__ import annotations

import asyncio

import pytest

from routerd.clock import VirtualClock, settle
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec, until


def ready_replicas(services, model_id):
    return sorted(
        i.replica
        for i in services.scheduler.instances()
        if f"{i.model}@{i.version}" == model_id and i.state == "ready"
    )


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def clock():
    return VirtualClock()


async def test_fixed_replicas_are_all_brought_up(tmp_path, backend, clock):
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "m", replicas=2)], clock=clock)
    try:
        async with services.scheduler.lease(services.router.resolve("m")) as lease:
            assert lease.instance.replica == 0
        await until(services.scheduler, lambda: ready_replicas(services, "m@1") == [0, 1])
        assert backend.loads == ["m@1", "m@1"]
        await services.scheduler.evict("m@1")
        assert services.scheduler.instances() == []
        assert sorted(backend.unloads) == ["m@1", "m@1"]
    finally:
        services.store.close()


async def test_busy_model_scales_up_and_routing_spreads_the_load(tmp_path, backend, clock):
    spec = fake_spec(tmp_path, "m", max_replicas=3, scale_up_queue=1, batching="none")
    services = fake_services(tmp_path, backend, [spec], clock=clock)
    record = services.router.resolve("m")
    served: list[int] = []

    async def burst(size: int) -> None:
        """``size`` requests that all hold their leases at once, then let go together."""
        release = asyncio.Event()
        holding = 0
        all_in = asyncio.Event()

        async def one() -> None:
            nonlocal holding
            async with services.scheduler.lease(record) as lease:
                served.append(lease.instance.replica)
                holding += 1
                if holding == size:
                    all_in.set()
                await release.wait()

        tasks = [asyncio.create_task(one()) for _ in range(size)]
        await all_in.wait()
        release.set()
        await asyncio.gather(*tasks)

    try:
        await burst(1)  # the first replica
        for expected in ([0, 1], [0, 1, 2]):  # every replica busy: one more each time
            await burst(6)
            await until(services.scheduler, lambda e=expected: ready_replicas(services, "m@1") == e)
        await burst(6)
        await settle()
        assert len(services.scheduler.instances()) == 3, "never more than max_replicas"
        served.clear()
        await burst(9)
        assert sorted(served) == [0, 0, 0, 1, 1, 1, 2, 2, 2], "least-outstanding spreads evenly"
    finally:
        services.store.close()


async def test_extra_replicas_scale_down_when_idle(tmp_path, backend, clock):
    spec = fake_spec(tmp_path, "m", replicas=1, max_replicas=2, scale_up_queue=1)
    services = fake_services(
        tmp_path, backend, [spec], clock=clock, scheduler={"keep_alive": 3600.0}
    )
    await services.scheduler.start(services.router.table.versions.get)
    record = services.router.resolve("m")
    try:
        async with services.scheduler.lease(record), services.scheduler.lease(record):
            pass
        await until(services.scheduler, lambda: ready_replicas(services, "m@1") == [0, 1])
        await clock.advance(29)
        assert ready_replicas(services, "m@1") == [0, 1], "scale_down_idle is 30 s"
        await clock.advance(2)
        await until(services.scheduler, lambda: ready_replicas(services, "m@1") == [0])
        # the replica leaves the ready list when it starts draining; the event follows
        # once it has unloaded
        await until(services.scheduler, lambda: len(services.scheduler.instances()) == 1)
        reasons = [e.reason for e in services.store.events() if e.kind == "evict"]
        assert reasons == ["scale-down"]
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_replica_never_evicts_other_models(tmp_path, clock):
    from routerd.devices import DeviceInventory
    from tests.fakes import MEMINFO

    backend = FakeBackend()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(None, meminfo=meminfo, cpu_budget=100)
    models = [
        fake_spec(tmp_path, "m", bytes=40, max_replicas=2, scale_up_queue=1),
        fake_spec(tmp_path, "other", bytes=40),
    ]
    services = fake_services(tmp_path, backend, models, devices=devices, clock=clock)
    try:
        await services.scheduler.load(services.router.resolve("other"))
        record = services.router.resolve("m")
        async with services.scheduler.lease(record), services.scheduler.lease(record):
            pass
        await services.scheduler.context.background.finish()  # the replica's attempt ended
        assert backend.loads == ["other@1", "m@1"], "no second replica was loaded"
        assert ready_replicas(services, "m@1") == [0]
        assert services.scheduler.instance("other@1") is not None
    finally:
        services.store.close()
