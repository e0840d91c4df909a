"""Reloads trust the footprint measured before: the backend is given it and may skip
its profile, unless the estimate changed or an operator asks for a new profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import Footprint
from routerd.clock import VirtualClock
from routerd.errors import Conflict
from routerd.services import Services
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def services(tmp_path: Path, backend: FakeBackend) -> Services:
    built = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "a", bytes=700)], clock=VirtualClock()
    )
    yield built
    built.store.close()


def load_events(services: Services) -> list[dict[str, object]]:
    events = services.store.events(limit=50)
    return [e.detail or {} for e in reversed(events) if e.kind == "load"]


async def test_a_reload_is_given_the_footprint_its_first_load_measured(services, backend):
    record = services.router.resolve("a")
    await services.scheduler.load(record)
    await services.scheduler.evict("a@1")
    await services.scheduler.load(record)
    stored = services.store.measured_footprint("a", "1", "cpu")
    assert stored is not None
    assert backend.knowns == [
        None,
        Footprint(
            weights=stored.weights_bytes,
            runtime=stored.runtime_bytes,
            working=stored.working_bytes,
        ),
    ]
    assert [e["profile"] for e in load_events(services)] == ["measured", "stored"]


async def test_a_changed_estimate_profiles_again(services, backend):
    record = services.router.resolve("a")
    await services.scheduler.load(record)
    await services.scheduler.evict("a@1")
    stored = services.store.measured_footprint("a", "1", "cpu")
    assert stored is not None
    # Measured under another estimate (other batch limits, say): not to be trusted now.
    services.store.record_footprint(
        "a",
        "1",
        "cpu",
        measured={
            "weights": stored.weights_bytes,
            "runtime": stored.runtime_bytes,
            "working": stored.working_bytes,
        },
        estimated_bytes=(stored.estimated_bytes or 0) + 1,
    )
    await services.scheduler.load(record)
    assert backend.knowns == [None, None]


async def test_reprofile_measures_anew_and_refuses_a_resident_version(services, backend):
    record = services.router.resolve("a")
    await services.scheduler.load(record)
    with pytest.raises(Conflict, match="evict it first"):
        await services.scheduler.load(record, reprofile=True)
    assert backend.loads == ["a@1"]  # nothing was loaded or evicted for it
    await services.scheduler.evict("a@1")
    await services.scheduler.load(record, reprofile=True)
    assert backend.knowns == [None, None]
    assert [e["profile"] for e in load_events(services)] == ["measured", "measured"]
