"""The ledger's invariant as a test-mode assertion (``SchedulerSettings.check_invariants``).

With it on, every change the lifecycle makes is followed by a check that each
device's instances plus reservations fit its capacity; a break raises at that
change, naming the device, its books and the change, and is kept for the test to
find. These tests show that it fires, that it stays silent when off, and that a
config reload does not turn it off.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from routerd.clock import VirtualClock
from routerd.config import DevicesConfig, SchedulerConfig
from routerd.devices import DeviceInventory
from routerd.scheduler import SchedulerSettings
from routerd.scheduler.residency import InvariantBroken
from routerd.services import Services
from tests.fakes import MEMINFO, FakeBackend, FakeGpus
from tests.support import fake_services, fake_spec

FOREIGN = os.getpid() + 1


def _services(tmp_path: Path, gpus: FakeGpus, *, checks: bool) -> Services:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    services = fake_services(
        tmp_path,
        FakeBackend(gpus),
        [fake_spec(tmp_path, "a", bytes=600, device="cuda:0")],
        devices=DeviceInventory(gpus, meminfo=meminfo, cpu_budget=0),
        devices_config={"gpu_headroom": 0},
        clock=VirtualClock(),
    )
    scheduler = services.scheduler
    settings = dataclasses.replace(scheduler.settings, check_invariants=checks)
    scheduler.context.settings = settings  # set, not reconfigured: that never turns it off
    return services


async def _load_then_crowd(services: Services, gpus: FakeGpus) -> None:
    """Load ``a`` (600 of 1000 bytes), then let another process take 500: the device
    now holds more than it has, and evicting ``a`` is the next change."""
    scheduler = services.scheduler
    async with scheduler.lease(services.router.resolve("a")):
        pass
    gpus.use(0, FOREIGN, 500)
    scheduler.ledger()  # the scheduler reads the device, as its poll does
    await scheduler.evict("a@1")


async def test_a_change_past_capacity_raises_naming_device_books_and_change(tmp_path):
    gpus = FakeGpus([1000])
    services = _services(tmp_path, gpus, checks=True)
    try:
        with pytest.raises(InvariantBroken) as caught:
            await _load_then_crowd(services, gpus)
        message = str(caught.value)
        assert caught.value.device == "cuda:0"
        assert "a@1 on cuda:0: ready → draining" in message  # the change
        assert "instances 600" in message and "capacity 500" in message  # the books
        assert "foreign 500" in message and "a@1 draining 600" in message
        breaks = services.scheduler.residency.invariant_breaks
        assert breaks == [caught.value]  # kept, for breaks raised where nobody looks
        breaks.clear()
    finally:
        services.store.close()


async def test_off_it_checks_nothing(tmp_path):
    gpus = FakeGpus([1000])
    services = _services(tmp_path, gpus, checks=False)
    try:
        await _load_then_crowd(services, gpus)
        assert services.scheduler.instances() == []
        assert services.scheduler.residency.invariant_breaks == []
    finally:
        services.store.close()


def test_it_is_off_unless_asked_and_a_reload_keeps_it_on(tmp_path):
    assert SchedulerSettings().check_invariants is False
    from_config = SchedulerSettings.from_config(SchedulerConfig(), DevicesConfig())
    assert from_config.check_invariants is False
    services = _services(tmp_path, FakeGpus([1000]), checks=True)
    try:
        services.scheduler.reconfigure(from_config, services.scheduler.placement)
        assert services.scheduler.settings.check_invariants is True
    finally:
        services.store.close()
