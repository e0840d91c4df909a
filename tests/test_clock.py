"""The scheduler's clock: virtual time fires timers in order and drives every wait."""

from __future__ import annotations

import asyncio
import time

import pytest

from routerd.clock import LoopClock, VirtualClock, settle


async def test_timers_fire_in_order_as_time_advances() -> None:
    clock = VirtualClock(start=100.0, wall_start=5000.0)
    fired: list[tuple[str, float]] = []
    clock.call_later(3, lambda: fired.append(("c", clock.now())))
    clock.call_later(1, lambda: fired.append(("a", clock.now())))
    cancelled = clock.call_later(2, lambda: fired.append(("never", clock.now())))
    clock.call_later(2, lambda: fired.append(("b", clock.now())))
    cancelled.cancel()
    await clock.advance(2.5)
    assert fired == [("a", 101.0), ("b", 102.0)]
    assert clock.now() == 102.5 and clock.wall() == 5002.5
    await clock.advance(10)
    assert fired[-1] == ("c", 103.0)
    assert clock.next_deadline() is None


async def test_sleep_returns_only_once_its_time_has_passed() -> None:
    clock = VirtualClock()
    sleeper = asyncio.create_task(clock.sleep(60))
    await clock.advance(59.9)
    assert not sleeper.done()
    await clock.advance(0.1)
    assert sleeper.done()


async def test_a_timer_set_by_a_woken_task_fires_within_the_same_advance() -> None:
    clock = VirtualClock(start=0.0)
    woke: list[float] = []

    async def twice() -> None:
        await clock.sleep(1)
        woke.append(clock.now())
        await clock.sleep(1)
        woke.append(clock.now())

    task = asyncio.create_task(twice())
    await clock.advance(5)
    assert woke == [1.0, 2.0] and task.done()


async def test_wait_for_times_out_on_virtual_time_and_cancels_the_work() -> None:
    clock = VirtualClock()
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(clock.wait_for(never, 30))
    await clock.advance(29)
    assert not waiting.done()
    await clock.advance(1)
    with pytest.raises(TimeoutError, match="30s"):
        await waiting
    assert never.cancelled()


async def test_wait_for_returns_the_result_and_leaves_no_timer() -> None:
    clock = VirtualClock()
    done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    done.set_result(7)
    assert await clock.wait_for(done, 30) == 7
    assert clock.next_deadline() is None
    inf: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    inf.set_result(8)
    assert await clock.wait_for(inf, float("inf")) == 8


async def test_a_cancelled_waiter_is_cancelled_not_timed_out() -> None:
    clock = VirtualClock()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(clock.wait_for(never, 30))
    await settle()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert never.cancelled()


async def test_run_until_idle_jumps_from_timer_to_timer() -> None:
    clock = VirtualClock(start=0.0)
    sleeper = asyncio.create_task(clock.sleep(3600))
    await clock.run_until_idle(limit=7200)
    assert sleeper.done() and clock.now() == 3600.0


async def test_the_loop_clock_uses_real_time_and_the_running_loop() -> None:
    clock = LoopClock()
    assert abs(clock.wall() - time.time()) < 5
    before = clock.now()
    await clock.sleep(0)
    assert clock.now() >= before
    pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await clock.wait_for(pending, 0)  # a zero timeout expires on the next loop turn
    fired = asyncio.Event()
    clock.call_later(0, fired.set)
    await fired.wait()
