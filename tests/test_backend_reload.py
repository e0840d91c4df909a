"""Every backend reloads (issue 16): a learned footprint never shrinks a grant below
what the backend needs to start, and echo and transformers versions serve the same
after an eviction and after a restart. vLLM's run is in ``test_vllm_reload.py``."""

from __future__ import annotations

from pathlib import Path

from backends.base import Backend, Footprint
from backends.echo import EchoBackend
from routerd.config import Config, SchedulerConfig, ServerConfig
from routerd.services import Services
from state import VersionSpec
from tests.fakes import FakeBackend, cpu_only_inventory
from tests.reloading import serve_evict_serve_restart
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


# -- real backends: load, serve, evict, serve, restart, serve --------------------------


def _config(state_dir: Path, spec: VersionSpec, root: Path) -> Config:
    return Config(
        state_dir=state_dir,
        models=(spec,),
        scheduler=SchedulerConfig(min_residency=0.0),
        server=ServerConfig(model_roots=(root,)),
    )


def _echo() -> Backend:
    return EchoBackend()


def _transformers() -> Backend:
    from backends.hf_transformers import TransformersBackend  # imports torch: only here

    return TransformersBackend()


async def test_an_echo_version_serves_the_same_after_eviction_and_restart(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "models" / "echo"
    folder.mkdir(parents=True)
    spec = VersionSpec("echo", "1", "echo", str(folder), {"bytes": 3 << 20})
    body = {"model": "echo", "prompt": "reload me", "max_tokens": 12, "temperature": 0}

    first, second, third = await serve_evict_serve_restart(
        _config(tmp_path / "state", spec, tmp_path),
        _echo,
        lambda: cpu_only_inventory(tmp_path),
        "echo@1",
        body,
    )

    assert first.text == "reload merel"  # the prompt echoed, repeated to 12 tokens
    assert second.text == first.text and third.text == first.text
    assert first.grant == first.estimate.total == 3 << 20
    assert second.grant == first.stored.measured_bytes
    assert third.grant == second.stored.measured_bytes


async def test_a_transformers_version_serves_the_same_after_eviction_and_restart(
    demo_root: Path, tmp_path: Path
) -> None:
    spec = VersionSpec("demo-small", "1", "transformers", str(demo_root / "demo-small"))
    body = {"model": "demo-small", "prompt": "def main():", "max_tokens": 16, "temperature": 0}

    first, second, third = await serve_evict_serve_restart(
        _config(tmp_path / "state", spec, demo_root),
        _transformers,
        lambda: cpu_only_inventory(tmp_path),
        "demo-small@1",
        body,
    )

    assert first.text and second.text == first.text and third.text == first.text
    assert first.grant == first.estimate.total
    # The later grants are the learned footprint, which differs from the estimate.
    assert first.stored.measured_bytes != first.estimate.total
    assert second.grant == first.stored.measured_bytes
    assert third.grant == second.stored.measured_bytes
