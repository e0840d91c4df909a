"""Every backend reloads (issue 16): a learned footprint never shrinks a grant below
what the backend needs to start."""

from __future__ import annotations

from pathlib import Path

from backends.base import Footprint
from routerd.services import Services
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec

# -- the rule, with a backend whose measurement is less than it needs to start --------


async def _load_and_evict(services: Services, model_id: str) -> None:
    try:
        await services.scheduler.load(services.router.resolve(model_id))
        await services.scheduler.evict(model_id)
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_measurement_below_the_start_minimum_grants_the_minimum(tmp_path: Path) -> None:
    # Measured 600, but the backend refuses to start in fewer than 800 bytes (as vLLM
    # does when a grant leaves no room for its KV cache after its overhead).
    spec = fake_spec(tmp_path, "m", bytes=600, estimate=1000, minimum=800)
    backend = FakeBackend()
    services = fake_services(tmp_path, backend, [spec])
    await services.scheduler.load(services.router.resolve("m"))
    stored = services.store.measured_footprint("m", "1", "cpu")
    assert stored is not None and stored.measured_bytes == 600
    await services.scheduler.evict("m@1")
    await _load_and_evict(services, "m@1")  # the reload starts: granted 800, not 600
    assert backend.grants == [1000, 800]

    restarted = FakeBackend()  # a new daemon over the same store learns the same 600
    await _load_and_evict(fake_services(tmp_path, restarted, [spec]), "m@1")
    assert restarted.grants == [800]


async def test_a_measurement_above_the_start_minimum_is_granted_as_it_is(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, "m", bytes=900, estimate=1000, minimum=800)
    backend = FakeBackend()
    services = fake_services(tmp_path, backend, [spec])
    await services.scheduler.load(services.router.resolve("m"))
    await services.scheduler.evict("m@1")
    await _load_and_evict(services, "m@1")
    assert backend.grants == [1000, 900]


async def test_what_a_load_needed_to_start_is_learned_not_only_what_it_holds(
    tmp_path: Path,
) -> None:
    # The instance holds 600 bytes but needed 900 to start (an engine's set-aside
    # overhead it has not touched): the ledger counts the 600 it holds, the store
    # learns the 900, and the next load is granted 900.
    spec = fake_spec(tmp_path, "m", bytes=600, estimate=1000, needed=900)
    backend = FakeBackend()
    services = fake_services(tmp_path, backend, [spec])
    snapshot = await services.scheduler.load(services.router.resolve("m"))
    assert snapshot.measured_bytes == 600 and snapshot.bytes == 600
    stored = services.store.measured_footprint("m", "1", "cpu")
    assert stored is not None and stored.measured_bytes == 900
    assert (stored.weights_bytes, stored.runtime_bytes, stored.working_bytes) == (600, 0, 300)
    await services.scheduler.evict("m@1")
    await _load_and_evict(services, "m@1")
    assert backend.grants == [1000, 900]


def test_needed_raises_working_until_the_total_covers_the_minimum() -> None:
    held = Footprint(weights=10, runtime=5, working=1, minimum=20)
    assert held.needed() == Footprint(weights=10, runtime=5, working=5, minimum=20)
    assert held.needed().total == 20
    roomy = Footprint(weights=10, runtime=5, working=9, minimum=20)
    assert roomy.needed() == roomy
    assert Footprint(weights=7).needed() == Footprint(weights=7)
