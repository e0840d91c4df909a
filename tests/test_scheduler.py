"""The scheduler's promises: single flight, leases, draining, failed loads, threads.

Every test runs the scheduler on a ``VirtualClock``: no timer fires unless a test
advances it, so "still waiting" is checked by letting the loop settle, never by
sleeping, and a timeout is reached by advancing virtual time.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from contract.generation import Generation, SamplingParams
from routerd.clock import VirtualClock, settle
from routerd.errors import Draining, LoadFailed, NotFound, Unavailable
from routerd.services import Services
from routerd.states import InstanceState
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec, until


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def services(tmp_path: Path, backend: FakeBackend, clock: VirtualClock) -> Services:
    models = [
        fake_spec(tmp_path, "a"),
        fake_spec(tmp_path, "b"),
        fake_spec(tmp_path, "broken", fail_load="weights are corrupt"),
    ]
    built = fake_services(tmp_path, backend, models, clock=clock)
    yield built
    built.store.close()


class HeldLease:
    """A request that holds its lease until ``release`` is set, like a long stream."""

    def __init__(self, services: Services, model_id: str) -> None:
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        record = services.router.resolve(model_id)

        async def request() -> None:
            async with services.scheduler.lease(record):
                self.holding.set()
                await self.release.wait()

        self.task = asyncio.create_task(request())

    async def started(self) -> HeldLease:
        await self.holding.wait()
        return self


async def test_twenty_concurrent_first_requests_cause_one_load(services, backend):
    record = services.router.resolve("a")
    backend.load_gate.clear()
    seen = []

    async def one_request() -> None:
        async with services.scheduler.lease(record) as lease:
            seen.append((lease.instance, lease.cold_start_ms))

    tasks = [asyncio.create_task(one_request()) for _ in range(20)]
    await backend.began(backend.loads, 1)
    await settle()
    assert backend.loads == ["a@1"], "every request joined the one load in flight"
    backend.load_gate.set()
    await asyncio.gather(*tasks)

    assert backend.loads == ["a@1"]
    assert len({id(instance) for instance, _ in seen}) == 1
    assert all(cold is not None and cold >= 0 for _, cold in seen)
    assert backend.models[0].warmed, "the instance must be warmed up before it serves"
    assert services.scheduler.instance("a@1").in_flight == 0


async def test_a_second_request_on_a_resident_model_is_not_a_cold_start(services, backend):
    record = services.router.resolve("a")
    async with services.scheduler.lease(record) as first:
        assert first.cold_start_ms is not None
    async with services.scheduler.lease(record) as second:
        assert second.cold_start_ms is None
    assert backend.loads == ["a@1"]


async def test_failed_load_reports_reason_and_leaves_the_rest_serving(services, backend):
    async with services.scheduler.lease(services.router.resolve("a")):
        pass
    with pytest.raises(LoadFailed, match="weights are corrupt") as caught:
        async with services.scheduler.lease(services.router.resolve("broken")):
            pass
    assert caught.value.status == 503
    assert services.scheduler.instance("broken@1") is None
    assert services.scheduler.instance("a@1").state == InstanceState.READY
    kinds = [(e.kind, e.model) for e in services.store.events()]
    assert ("load_failed", "broken") in kinds
    assert ("load", "a") in kinds
    # A later request tries again rather than remembering the failure forever.
    with pytest.raises(LoadFailed):
        await services.scheduler.load(services.router.resolve("broken"))
    assert backend.loads.count("broken@1") == 2


async def test_loaded_model_answers_while_another_model_loads(services, backend):
    a = services.router.resolve("a")
    await services.scheduler.load(a)
    backend.load_gate.clear()
    loading_b = asyncio.create_task(services.scheduler.load(services.router.resolve("b")))
    await backend.began(backend.loads, 2)

    async with services.scheduler.lease(a) as lease:
        result = await asyncio.wait_for(
            lease.instance.run(
                lease.instance.model.generate, Generation([104, 105], SamplingParams(max_tokens=2))
            ),
            timeout=2,
        )
    assert result.text == "ih"
    assert not loading_b.done()
    backend.load_gate.set()
    assert (await loading_b).state == "ready"


async def test_each_instance_loads_on_its_own_thread(services, backend):
    await services.scheduler.load(services.router.resolve("a"))
    await services.scheduler.load(services.router.resolve("b"))
    main = threading.current_thread().name
    assert main not in backend.load_threads
    assert len(set(backend.load_threads)) == 2


async def test_request_calls_use_the_instance_thread_unless_the_model_is_inline(
    tmp_path, backend, clock
):
    from routerd.serving.choices import Row, generate_rows
    from routerd.serving.prompts import PreparedPrompt

    models = [fake_spec(tmp_path, "threaded"), fake_spec(tmp_path, "inline", inline=True)]
    services = fake_services(tmp_path, backend, models, clock=clock)
    main = threading.current_thread().name
    try:
        for name in ("threaded", "inline"):
            async with services.scheduler.lease(services.router.resolve(name)) as lease:
                ids = await lease.handle.tokenize("ab")
                prompt = PreparedPrompt(ids, SamplingParams(max_tokens=2))
                (result,) = await generate_rows(lease.handle, [Row(0, prompt)])
                assert result.text == "ba"
        threaded_thread, inline_thread = backend.generate_threads
        assert threaded_thread != main and threaded_thread.startswith("routerd-threaded@1")
        assert inline_thread == main
        assert main not in backend.load_threads, "loading always uses the instance thread"
    finally:
        services.store.close()


async def test_eviction_waits_for_live_leases_streaming_included(services, backend):
    held = await HeldLease(services, "a").started()
    eviction = asyncio.create_task(services.scheduler.evict("a@1", reason="test"))
    await settle()
    assert not eviction.done()
    assert services.scheduler.instance("a@1").state == InstanceState.DRAINING
    assert backend.unloads == []
    held.release.set()
    await held.task
    snapshot = await eviction
    assert snapshot.model == "a"
    assert backend.unloads == ["a@1"]
    assert services.scheduler.instance("a@1") is None
    assert any(e.kind == "evict" and e.reason == "test" for e in services.store.events())


async def test_cancelled_request_returns_its_lease(services):
    record = services.router.resolve("a")
    inside = asyncio.Event()

    async def request() -> None:
        async with services.scheduler.lease(record):
            inside.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(request())
    await inside.wait()
    assert services.scheduler.instance("a@1").in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert services.scheduler.instance("a@1").in_flight == 0


async def test_request_during_drain_waits_and_gets_a_fresh_instance(services, backend):
    record = services.router.resolve("a")
    held = await HeldLease(services, "a").started()
    eviction = asyncio.create_task(services.scheduler.evict("a@1", reason="test"))
    await until(services.scheduler, lambda: services.scheduler.instance("a@1").state == "draining")

    async def late_request() -> str:
        async with services.scheduler.lease(record) as lease:
            return str(lease.instance.state)

    late = asyncio.create_task(late_request())
    await settle()
    assert not late.done(), "a draining instance must not take new leases"
    held.release.set()
    await held.task
    await eviction
    assert await late == "ready"
    assert backend.loads == ["a@1", "a@1"]


async def test_waiter_that_times_out_does_not_cancel_the_shared_load(tmp_path, backend, clock):
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "a")], load_timeout=60.0, clock=clock
    )
    try:
        backend.load_gate.clear()
        waiter = asyncio.create_task(services.scheduler.load(services.router.resolve("a")))
        await backend.began(backend.loads, 1)
        await clock.advance(59)
        assert not waiter.done(), "load_timeout has not passed yet"
        await clock.advance(1)
        with pytest.raises(Unavailable, match="still loading after 60s") as caught:
            await waiter
        assert caught.value.retry_after
        backend.load_gate.set()
        await until(
            services.scheduler,
            lambda: (
                services.scheduler.instance("a@1") is not None
                and services.scheduler.instance("a@1").state == "ready"
            ),
        )
        assert backend.loads == ["a@1"]
    finally:
        services.store.close()


async def test_unknown_device_fails_the_load_clearly(tmp_path, backend, clock):
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "gpu", device="cuda:3")], clock=clock
    )
    try:
        with pytest.raises(Unavailable, match="cuda:3") as caught:
            await services.scheduler.load(services.router.resolve("gpu"))
        assert caught.value.status == 503
        assert backend.loads == []
    finally:
        services.store.close()


async def test_evicting_what_is_not_loaded_is_not_found(services):
    with pytest.raises(NotFound):
        await services.scheduler.evict("a@1", reason="test")


async def test_devices_report_reserved_bytes_while_loading(services, backend):
    backend.load_gate.clear()
    loading = asyncio.create_task(services.scheduler.load(services.router.resolve("a")))
    await backend.began(backend.loads, 1)
    cpu = next(d for d in services.scheduler.devices() if d.id == "cpu")
    assert cpu.reserved_bytes == 1000  # the backend's estimate, claimed before loading
    assert cpu.total_bytes == 16000000 * 1024
    backend.load_gate.set()
    await loading
    cpu = next(d for d in services.scheduler.devices() if d.id == "cpu")
    assert cpu.reserved_bytes == 0
    assert cpu.routerd_bytes == 1000


async def test_close_unloads_everything_and_refuses_new_leases(services, backend):
    await services.scheduler.load(services.router.resolve("a"))
    await services.scheduler.load(services.router.resolve("b"))
    await services.scheduler.close()
    assert sorted(backend.unloads) == ["a@1", "b@1"]
    assert services.scheduler.instances() == []
    with pytest.raises(Draining):
        await services.scheduler.load(services.router.resolve("a"))
