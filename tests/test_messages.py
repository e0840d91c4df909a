"""Health and progress reach the scheduler as messages it consumes on its loop.

An instance (its batcher, its backend thread) only posts; the scheduler decides,
in a loop turn of its own, what becomes of the instance.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backends.base import READING_WEIGHTS, LoadProgress
from routerd.clock import VirtualClock, settle
from routerd.messages import LoadProgressed
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec, until


async def test_a_failure_posted_from_the_instance_thread_retires_the_instance(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    services = fake_services(
        tmp_path,
        backend,
        [fake_spec(tmp_path, "a")],
        clock=VirtualClock(),
        scheduler={"max_failures": 2},
    )
    scheduler = services.scheduler
    try:
        await scheduler.load(services.router.resolve("a"))
        instance = scheduler.residency.get("a@1")
        assert instance is not None
        await instance.run(instance.report_failure, "first")
        await settle()
        assert scheduler.instance("a@1").state == "ready", "one failure is below max_failures"
        await instance.run(instance.report_failure, "backend error: boom")
        await until(scheduler, lambda: scheduler.instance("a@1") is None)
        (failure,) = scheduler.failures()
        assert (failure.model, failure.reason, failure.times) == ("a", "backend error: boom", 1)
        await backend.began(backend.unloads, 1)
        await scheduler.context.background.finish()
        assert instance.state == "gone" and backend.unloads == ["a@1"]
        kinds = [e.kind for e in services.store.events()]
        assert "failed" in kinds
    finally:
        services.store.close()


async def test_a_message_is_consumed_in_its_own_turn_not_inside_the_sender(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "a")], clock=VirtualClock())
    scheduler = services.scheduler
    try:
        await scheduler.load(services.router.resolve("a"))
        instance = scheduler.residency.get("a@1")
        assert instance is not None
        instance.report_failure("crashed", fatal=True)  # on the loop thread itself
        assert scheduler.instance("a@1") is not None, "the sender never runs the handler"
        await settle()
        assert scheduler.instance("a@1") is None
    finally:
        await scheduler.context.background.finish()
        services.store.close()


async def test_progress_is_shown_while_loading_and_a_late_report_is_dropped(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "a", bytes=4096)], clock=VirtualClock()
    )
    scheduler = services.scheduler
    try:
        backend.load_gate.clear()
        loading = asyncio.create_task(scheduler.load(services.router.resolve("a")))
        await backend.began(backend.loads, 1)
        await until(scheduler, lambda: scheduler.instance("a@1").progress is not None)
        progress = scheduler.instance("a@1").progress
        assert (progress.phase, progress.done_bytes, progress.total_bytes) == (
            READING_WEIGHTS,
            2048,
            4096,
        )
        backend.load_gate.set()
        await loading
        instance = scheduler.residency.get("a@1")
        assert instance is not None and instance.post is not None
        instance.post(LoadProgressed(instance, LoadProgress(READING_WEIGHTS, 1, 2)))
        await settle()
        assert scheduler.instance("a@1").progress is None, "a ready instance shows no load"
    finally:
        services.store.close()
