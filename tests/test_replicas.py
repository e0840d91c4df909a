"""Replicas: a fixed count, scale-up under load, scale-down when idle, spread by routing."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import FakeBackend
from tests.support import FakeClock, fake_services, fake_spec


async def wait_until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def ready_replicas(services, model_id):
    return sorted(
        i.replica
        for i in services.scheduler.instances()
        if f"{i.model}@{i.version}" == model_id and i.state == "ready"
    )


@pytest.fixture
def backend():
    return FakeBackend()


async def test_fixed_replicas_are_all_brought_up(tmp_path, backend):
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "m", replicas=2)])
    try:
        async with services.scheduler.lease(services.router.resolve("m")) as lease:
            assert lease.instance.replica == 0
        await wait_until(lambda: ready_replicas(services, "m@1") == [0, 1])
        assert backend.loads == ["m@1", "m@1"]
        await services.scheduler.evict("m@1")
        assert services.scheduler.instances() == []
        assert sorted(backend.unloads) == ["m@1", "m@1"]
    finally:
        services.store.close()


async def test_busy_model_scales_up_and_routing_spreads_the_load(tmp_path, backend):
    spec = fake_spec(
        tmp_path,
        "m",
        max_replicas=3,
        scale_up_queue=1,
        batching="none",
        token_delay=0.005,
        context=4096,
    )
    services = fake_services(tmp_path, backend, [spec])
    record = services.router.resolve("m")
    served: list[int] = []

    async def one() -> None:
        async with services.scheduler.lease(record) as lease:
            served.append(lease.instance.replica)
            await asyncio.sleep(0.05)

    try:
        await one()  # the first replica
        for _ in range(10):  # bursts keep every replica busy: one more each time
            await asyncio.gather(*(one() for _ in range(6)))
            if len(ready_replicas(services, "m@1")) == 3:
                break
        assert ready_replicas(services, "m@1") == [0, 1, 2]
        await asyncio.gather(*(one() for _ in range(6)))
        assert len(services.scheduler.instances()) == 3, "never more than max_replicas"
        served.clear()
        await asyncio.gather(*(one() for _ in range(9)))
        assert sorted(set(served)) == [0, 1, 2], "least-outstanding spreads over replicas"
        assert max(served.count(r) for r in (0, 1, 2)) <= 4
    finally:
        services.store.close()


async def test_extra_replicas_scale_down_when_idle(tmp_path, backend):
    clock = FakeClock()
    spec = fake_spec(tmp_path, "m", replicas=1, max_replicas=2, scale_up_queue=1)
    services = fake_services(
        tmp_path, backend, [spec], clock=clock, scheduler={"keep_alive": 3600.0}
    )
    await services.scheduler.start(services.router.table.versions.get)
    record = services.router.resolve("m")
    try:
        async with services.scheduler.lease(record), services.scheduler.lease(record):
            pass
        await wait_until(lambda: ready_replicas(services, "m@1") == [0, 1])
        clock.advance(31)
        await wait_until(lambda: ready_replicas(services, "m@1") == [0])
        # the replica leaves the ready list when it starts draining; the event follows
        # once it has unloaded
        await wait_until(lambda: len(services.scheduler.instances()) == 1)
        reasons = [e.reason for e in services.store.events() if e.kind == "evict"]
        assert reasons == ["scale-down"]
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_replica_never_evicts_other_models(tmp_path):
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
    services = fake_services(tmp_path, backend, models, devices=devices)
    try:
        await services.scheduler.load(services.router.resolve("other"))
        record = services.router.resolve("m")
        async with services.scheduler.lease(record), services.scheduler.lease(record):
            pass
        await asyncio.sleep(0.1)
        assert ready_replicas(services, "m@1") == [0]
        assert services.scheduler.instance("other@1") is not None
    finally:
        services.store.close()
