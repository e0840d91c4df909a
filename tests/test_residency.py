"""Memory-aware residency with fakes: budgets, LRU, waiting, pins, keep-alive, NVML, OOM.

The scheduler runs on a ``VirtualClock`` here: keep-alive, minimum residency, load
waits and release checks all move only when a test advances it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from routerd.clock import VirtualClock, settle
from routerd.devices import DeviceInventory
from routerd.errors import LoadFailed, Unavailable
from tests.fakes import MEMINFO, FakeBackend, FakeGpus
from tests.support import LedgerWatch, fake_services, fake_spec, until, waiting_on

MiB = 1024**2


def events(services, kind=None):
    found = list(reversed(services.store.events(limit=1000)))
    return [
        (e.kind, f"{e.model}@{e.version}", e.reason, e.trigger)
        for e in found
        if kind is None or e.kind == kind
    ]


async def request(services, name, **lease_args):
    async with services.scheduler.lease(services.router.resolve(name), **lease_args) as lease:
        return lease.instance.device


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def clock():
    return VirtualClock()


def cpu_services(tmp_path, backend, models, budget, clock, **kw):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(None, meminfo=meminfo, cpu_budget=budget)
    return fake_services(tmp_path, backend, models, devices=devices, clock=clock, **kw)


def gone(services, model_id):
    return lambda: services.scheduler.instance(model_id) is None


async def test_lru_order_under_a_budget_for_two_of_three(tmp_path, backend, clock):
    watch = LedgerWatch()
    models = [fake_spec(tmp_path, n, bytes=b) for n, b in (("s", 10), ("m", 40), ("l", 50))]
    services = cpu_services(
        tmp_path,
        backend,
        models,
        budget=95,
        clock=clock,
        on_change=watch,
        scheduler={"eviction": "lru"},
    )
    try:
        for name in ("s", "m", "l", "s"):
            await request(services, name)
            await clock.advance(1)  # each is used a second after the one before
        assert events(services, "evict") == [
            ("evict", "s@1", "lru", "l@1"),
            ("evict", "m@1", "lru", "s@1"),
        ]
        assert sorted(i.model for i in services.scheduler.instances()) == ["l", "s"]
        assert {r for _, _, r, _ in events(services, "load")} == {"request"}
        assert watch.checks > 10 and watch.worst_over == 0
    finally:
        services.store.close()


async def test_fifty_concurrent_requests_on_three_models_that_do_not_fit(tmp_path, backend, clock):
    watch = LedgerWatch()
    models = [fake_spec(tmp_path, "stream", bytes=30, token_delay=0.002, context=4096)]
    models += [fake_spec(tmp_path, n, bytes=40, token_delay=0.001) for n in ("x", "y", "z")]
    services = cpu_services(tmp_path, backend, models, budget=80, clock=clock, on_change=watch)
    scheduler = services.scheduler
    try:
        stream_record = services.router.resolve("stream")
        async with scheduler.lease(stream_record) as streaming:
            # The long stream holds its lease the whole time: it must never be evicted.
            async def one(i):
                name = ("x", "y", "z")[i % 3]
                async with scheduler.lease(services.router.resolve(name)) as lease:
                    await lease.instance.run(lambda: None)
                    return name

            results = await asyncio.gather(*(one(i) for i in range(50)))
            assert streaming.instance.state == "ready"
        assert sorted(results) == sorted(("x", "y", "z")[i % 3] for i in range(50))
        assert "stream@1" not in backend.unloads
        assert watch.worst_over == 0 and watch.checks > 0
        assert len(events(services, "evict")) >= 2
    finally:
        services.store.close()


async def test_too_large_fails_at_once_naming_bytes_and_device(tmp_path, backend, clock):
    services = cpu_services(
        tmp_path, backend, [fake_spec(tmp_path, "huge", bytes=500)], budget=100, clock=clock
    )
    try:
        with pytest.raises(Unavailable, match=r"needs .*500 bytes.*cpu") as caught:
            await request(services, "huge")
        assert caught.value.status == 503 and caught.value.retry_after is None
        assert backend.loads == []
    finally:
        services.store.close()


async def test_busy_room_waits_then_503_with_retry_after(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "a", bytes=60), fake_spec(tmp_path, "b", bytes=60)]
    services = cpu_services(
        tmp_path, backend, models, budget=100, clock=clock, scheduler={"load_wait_timeout": 20}
    )
    try:
        async with services.scheduler.lease(services.router.resolve("a")):
            waiting = asyncio.create_task(request(services, "b"))
            await waiting_on(clock, 2)  # its load's timeout, and the wait for room
            await clock.advance(19.9)
            assert not waiting.done(), "the wait for room lasts load_wait_timeout"
            await clock.advance(0.1)
            with pytest.raises(Unavailable, match="serving requests") as caught:
                await waiting
        assert caught.value.retry_after is not None
        assert backend.loads == ["a@1"]
        # Once the lease ends, the same request succeeds by evicting a.
        assert await request(services, "b") == "cpu"
        assert events(services, "evict") == [("evict", "a@1", "cost", "b@1")]
    finally:
        services.store.close()


async def test_waiting_request_gets_room_when_the_lease_ends(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "a", bytes=60), fake_spec(tmp_path, "b", bytes=60)]
    services = cpu_services(tmp_path, backend, models, budget=100, clock=clock)
    try:
        release = asyncio.Event()

        async def hold_a():
            async with services.scheduler.lease(services.router.resolve("a")):
                await release.wait()

        holder = asyncio.create_task(hold_a())
        await backend.began(backend.loads, 1)
        waiting = asyncio.create_task(request(services, "b"))
        await waiting_on(clock, 2)  # its load's timeout, and the wait for room
        await clock.advance(5)
        assert not waiting.done()
        release.set()
        await holder
        assert await asyncio.wait_for(waiting, 5) == "cpu"
    finally:
        services.store.close()


async def test_min_residency_bounds_thrashing(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "a", bytes=60), fake_spec(tmp_path, "b", bytes=60)]
    services = cpu_services(
        tmp_path, backend, models, budget=100, clock=clock, scheduler={"min_residency": 10.0}
    )
    try:
        await request(services, "a")
        waiting = asyncio.create_task(request(services, "b"))
        await waiting_on(clock, 2)  # its load's timeout, and the wait for room
        await clock.advance(9.9)
        assert not waiting.done(), "a is younger than min_residency and must stay"
        await clock.advance(0.1)
        await asyncio.wait_for(waiting, 5)
        assert backend.unloads == ["a@1"]
    finally:
        services.store.close()


async def test_keep_alive_expiry_and_per_request_override(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "a", keep_alive="30s"), fake_spec(tmp_path, "b")]
    services = cpu_services(tmp_path, backend, models, budget=10_000, clock=clock)
    await services.scheduler.start(services.router.table.versions.get)
    try:
        await request(services, "a")
        await request(services, "b", keep_alive=float("inf"))
        snapshot = services.scheduler.instance("a@1")
        assert snapshot.expires_at == pytest.approx(clock.wall() + 30)
        await clock.advance(29.5)
        assert services.scheduler.instance("a@1").state == "ready", "not expired yet"
        await clock.advance(1)
        await until(services.scheduler, gone(services, "a@1"))
        assert events(services, "evict") == [("evict", "a@1", "ttl", None)]
        await clock.advance(300)
        assert services.scheduler.instance("b@1") is not None, "keep_alive -1 means never"
        await request(services, "b", keep_alive=0.0)
        await until(services.scheduler, gone(services, "b@1"))
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_a_release_due_before_the_reapers_next_look_wakes_it(tmp_path, backend, clock):
    """The reaper sleeps up to a second between looks; keep_alive 0 must not wait for it."""
    models = [fake_spec(tmp_path, "long", keep_alive="30s"), fake_spec(tmp_path, "now")]
    services = cpu_services(tmp_path, backend, models, budget=10_000, clock=clock)
    await services.scheduler.start(services.router.table.versions.get)
    try:
        await request(services, "long")
        await request(services, "now", keep_alive=float("inf"))
        await settle()  # the reaper has looked and waits for its next look
        assert clock.next_deadline() is not None, "the reaper waits on the clock"
        # Virtual time stands still from here: only the release itself can wake the reaper.
        await request(services, "now", keep_alive=0.0)
        await until(services.scheduler, gone(services, "now@1"))
        assert services.scheduler.instance("long@1") is not None
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_the_reaper_rests_while_nothing_could_expire(tmp_path, backend, clock):
    """With every instance kept for ever the reaper looks once an hour, not once a
    second; a finite keep-alive brings back its one-second looks, and a release due
    sooner still wakes it at once."""
    from routerd.scheduler.keepalive import MAX_LOOK_S, QUIET_LOOK_S

    models = [fake_spec(tmp_path, "kept", keep_alive=-1), fake_spec(tmp_path, "brief")]
    services = cpu_services(tmp_path, backend, models, budget=10_000, clock=clock)
    await services.scheduler.start(services.router.table.versions.get)
    reaper = services.scheduler._reaper
    try:
        await request(services, "kept")
        assert reaper.look() == QUIET_LOOK_S
        await request(services, "brief", keep_alive=30.0)
        assert reaper.look() == MAX_LOOK_S
        await request(services, "brief", keep_alive=float("inf"))
        assert reaper.look() == QUIET_LOOK_S
        await settle()  # the reaper waits for its hour
        await request(services, "kept", keep_alive=0.0)
        await until(services.scheduler, gone(services, "kept@1"))
        assert services.scheduler.instance("brief@1") is not None
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_pinned_instance_is_never_evicted_and_blocks_clearly(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "p", bytes=70), fake_spec(tmp_path, "q", bytes=50)]
    services = cpu_services(tmp_path, backend, models, budget=100, clock=clock)
    try:
        await request(services, "p")
        services.scheduler.pin(services.router.resolve("p"))
        with pytest.raises(Unavailable, match="pinned"):
            await request(services, "q")
        assert services.scheduler.instance("p@1").pinned
        services.scheduler.unpin(services.router.resolve("p"))
        await request(services, "q")
        assert backend.unloads == ["p@1"]
    finally:
        services.store.close()


async def test_pinned_versions_load_again_after_restart(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "p"), fake_spec(tmp_path, "other")]
    first = fake_services(tmp_path, backend, models, clock=clock)
    first.scheduler.pin(first.router.resolve("p"))
    first.store.close()
    second = fake_services(tmp_path, backend, models, clock=clock)
    try:
        await second.scheduler.start(second.router.table.versions.get)
        await until(
            second.scheduler,
            lambda: (
                second.scheduler.instance("p@1") is not None
                and second.scheduler.instance("p@1").state == "ready"
            ),
        )
        assert second.scheduler.instance("other@1") is None
        loads = [(k, m, r) for k, m, r, _ in events(second, "load")]
        assert loads[-1] == ("load", "p@1", "restore")
        await second.scheduler.load(second.router.resolve("other"))
        assert events(second, "load")[-1][:3] == ("load", "other@1", "manual")
    finally:
        await second.scheduler.close()
        second.store.close()


async def test_forced_eviction_ends_live_requests_with_a_clear_error(tmp_path, backend, clock):
    from contract.generation import SamplingParams
    from routerd.serving.choices import Row, generate_rows
    from routerd.serving.prompts import PreparedPrompt

    models = [fake_spec(tmp_path, "slow", token_delay=0.01, context=100_000)]
    services = fake_services(tmp_path, backend, models, clock=clock)
    try:
        prompt = PreparedPrompt([97], SamplingParams(max_tokens=5000))

        leased = asyncio.Event()

        async def long_request():
            async with services.scheduler.lease(services.router.resolve("slow")) as lease:
                leased.set()
                return (await generate_rows(lease.handle, [Row(0, prompt)]))[0]

        running = asyncio.create_task(long_request())
        await leased.wait()
        await settle()  # the generation has started on the instance thread
        assert services.scheduler.instance("slow@1").in_flight == 1
        await asyncio.wait_for(services.scheduler.evict("slow@1", force=True), 5)
        with pytest.raises(Unavailable, match="evicted by an operator"):
            await running
        assert backend.unloads == ["slow@1"]
    finally:
        services.store.close()


def gpu_inventory(tmp_path, gpus, cpu_budget=0):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    return DeviceInventory(gpus, meminfo=meminfo, cpu_budget=cpu_budget)


async def test_fake_nvml_foreign_process_steers_placement(tmp_path, clock):
    gpus = FakeGpus([1000 * MiB, 1000 * MiB])
    backend = FakeBackend(gpus)
    models = [fake_spec(tmp_path, n, bytes=300 * MiB, device="cuda") for n in ("a", "b", "c")]
    services = fake_services(
        tmp_path,
        backend,
        models,
        devices=gpu_inventory(tmp_path, gpus),
        devices_config={"gpu_headroom": 0},
        scheduler={"placement": "spread"},
        clock=clock,
    )
    try:
        foreign = os.getpid() + 1
        gpus.use(0, foreign, 600 * MiB)  # someone else's job grows on GPU 0
        assert await request(services, "a") == "cuda:1"
        rows = {r.device: r for r in services.scheduler.ledger()}
        assert rows["cuda:0"].foreign == 600 * MiB
        assert rows["cuda:1"].ours == 300 * MiB
        assert gpus.usage[1][os.getpid()] == 300 * MiB
        assert await request(services, "b") == "cuda:1"  # 400 MiB left on 0, 700 on 1
        gpus.use(0, foreign, 0)  # the foreign job ends
        assert await request(services, "c") == "cuda:0"
    finally:
        services.store.close()


async def test_eviction_whose_memory_does_not_come_back_is_marked_leaked(tmp_path, clock):
    gpus = FakeGpus([1000 * MiB])
    backend = FakeBackend(gpus)
    models = [
        fake_spec(tmp_path, "leaky", bytes=600 * MiB, device="cuda:0", leak=True),
        fake_spec(tmp_path, "next", bytes=600 * MiB, device="cuda:0"),
    ]
    services = fake_services(
        tmp_path,
        backend,
        models,
        devices=gpu_inventory(tmp_path, gpus),
        devices_config={"gpu_headroom": 0},
        scheduler={"release_timeout": 2, "load_wait_timeout": 3},
        clock=clock,
    )
    try:
        await request(services, "leaky")
        eviction = asyncio.create_task(services.scheduler.evict("leaky@1"))
        await waiting_on(clock, 1)  # unloaded; now watching for the memory to come back
        await clock.advance(1.9)
        assert not eviction.done(), "the memory may still come back within release_timeout"
        await clock.advance(0.1)
        await eviction
        (leak,) = services.scheduler.leaks()
        assert (leak.model_id, leak.device, leak.bytes) == ("leaky@1", "cuda:0", 600 * MiB)
        assert ("leak", "leaky@1") in [(k, m) for k, m, _, _ in events(services)]
        row = services.scheduler.ledger()[0]
        assert row.ours == 600 * MiB, "leaked bytes stay in the ledger"
        waiting = asyncio.create_task(request(services, "next"))
        await waiting_on(clock, 2)  # its load's timeout, and the wait for room
        await clock.advance(3)
        with pytest.raises(Unavailable):
            await waiting
    finally:
        services.store.close()


async def test_out_of_memory_at_load_evicts_more_and_retries_once(tmp_path, backend, clock):
    models = [
        fake_spec(tmp_path, "idle", bytes=50),
        fake_spec(tmp_path, "flaky", bytes=40, oom_loads=1),
        fake_spec(tmp_path, "hopeless", bytes=40, oom_loads=5),
    ]
    services = cpu_services(tmp_path, backend, models, budget=100, clock=clock)
    try:
        await request(services, "idle")
        assert await request(services, "flaky") == "cpu"
        assert backend.loads.count("flaky@1") == 2
        assert ("evict", "idle@1", "oom-retry", "flaky@1") in events(services, "evict")
        with pytest.raises(LoadFailed, match="out of memory"):
            await request(services, "hopeless")
        assert services.scheduler.instance("hopeless@1") is None
        assert ("load_failed", "hopeless@1") in [(k, m) for k, m, _, _ in events(services)]
    finally:
        services.store.close()


async def test_measured_footprint_is_stored_and_replaces_the_estimate(tmp_path, backend, clock):
    models = [fake_spec(tmp_path, "m", bytes=70, estimate=20), fake_spec(tmp_path, "n", bytes=50)]
    services = cpu_services(tmp_path, backend, models, budget=100, clock=clock)
    try:
        await request(services, "m")
        stored = services.store.measured_footprint("m", "1", "cpu")
        assert stored.measured_bytes == 70 and stored.estimated_bytes == 20
        snapshot = services.scheduler.instance("m@1")
        assert (snapshot.estimated_bytes, snapshot.measured_bytes) == (20, 70)
        await services.scheduler.evict("m@1")
        # The next placement plans with the measured 70, not the estimated 20: with n
        # resident (50) that no longer fits, so n is evicted first.
        await request(services, "n")
        await request(services, "m")
        assert ("evict", "n@1", "cost", "m@1") in events(services, "evict")
    finally:
        services.store.close()


async def test_operator_load_on_a_chosen_device(tmp_path, clock):
    gpus = FakeGpus([1000 * MiB, 1000 * MiB])
    backend = FakeBackend(gpus)
    services = fake_services(
        tmp_path,
        backend,
        [fake_spec(tmp_path, "a", bytes=MiB)],
        devices=gpu_inventory(tmp_path, gpus, cpu_budget=100 * MiB),
        clock=clock,
    )
    try:
        snapshot = await services.scheduler.load(services.router.resolve("a"), device="cuda:1")
        assert snapshot.device == "cuda:1"
        await services.scheduler.evict("a@1")
        snapshot = await services.scheduler.load(services.router.resolve("a"), device="cpu")
        assert snapshot.device == "cpu"
        assert backend.load_devices == ["cuda:1", "cpu"]
    finally:
        services.store.close()


def test_ledger_rows_keep_path_free(tmp_path):
    """Sanity on the fakes: a fresh CPU-only inventory has one device, the budget."""
    inventory = gpu_inventory(tmp_path, None, cpu_budget=123)
    assert [r.budget_bytes for r in inventory.readings()] == [123]
    assert Path(tmp_path / "meminfo").exists()


def test_scheduler_options_are_validated_and_normalized(tmp_path, backend):
    from contract.errors import InvalidRequest

    services = fake_services(tmp_path, backend)
    try:
        spec = fake_spec(tmp_path, "k", keep_alive="-1", devices=["cuda", "cpu"])
        record = services.registry.register(spec)
        assert record.options["keep_alive"] == -1
        assert record.options["devices"] == ["cuda", "cpu"]
        for bad, param in (
            ({"devices": ["gpu"]}, "options.devices"),
            ({"devices": "cuda"}, "options.devices"),
            ({"keep_alive": "soon"}, "options.keep_alive"),
            ({"device": "tpu"}, "options.device"),
        ):
            with pytest.raises(InvalidRequest) as caught:
                services.registry.register(fake_spec(tmp_path, "bad", **bad))
            assert caught.value.param == param
    finally:
        services.store.close()
