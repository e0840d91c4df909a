"""Request deadlines watched per time slice (``routerd.api.limits.Deadlines``)."""

from __future__ import annotations

import asyncio

import pytest

from routerd.api.limits import Deadlines


async def _sleeper(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def test_a_deadline_cancels_its_task_never_early_and_at_most_one_slice_late():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(_sleeper(10))
    started = loop.time()
    watch = deadlines.watch(task, 0.2)
    with pytest.raises(asyncio.CancelledError):
        await task
    took = loop.time() - started
    assert watch.expired
    assert 0.2 <= took < 0.2 + 0.05 + 0.1  # one slice (50 ms) plus scheduling slack
    deadlines.close()


async def test_requests_finished_in_time_are_left_alone_and_share_one_timer():
    deadlines = Deadlines()
    tasks = [asyncio.ensure_future(_sleeper(0.01)) for _ in range(50)]
    watches = [deadlines.watch(t, 0.1) for t in tasks]
    assert len({w.fires_at for w in watches}) <= 2, "requests of one slice share its timer"
    assert len(deadlines._timers) <= 2
    await asyncio.gather(*tasks)
    for watch in watches:
        deadlines.forget(watch)
    await asyncio.sleep(0.2)  # the slices' timers fire with no one left in them
    assert not any(w.expired for w in watches)
    assert all(not t.cancelled() for t in tasks)
    assert not deadlines._slices and not deadlines._timers


async def test_a_short_timeout_gets_a_finer_slice():
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(_sleeper(10))
    started = loop.time()
    watch = deadlines.watch(task, 0.02)
    assert watch.fires_at - started <= 0.02 + 0.005 + 1e-9  # slice: timeout / 4
    with pytest.raises(asyncio.CancelledError):
        await task
    deadlines.close()


async def test_the_deadline_is_told_apart_from_another_cancellation():
    deadlines = Deadlines()
    outcome: dict[str, bool] = {}

    async def guarded(timeout: float, also_cancel: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = deadlines.watch(task, timeout)
        try:
            if also_cancel:
                asyncio.get_running_loop().call_later(timeout / 2, task.cancel)
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            outcome[f"timed_out_{also_cancel}"] = watch.timed_out()
            if not outcome[f"timed_out_{also_cancel}"]:
                raise
        finally:
            deadlines.forget(watch)

    await guarded(0.05, also_cancel=False)  # the deadline's: handled, not re-raised
    assert outcome["timed_out_False"] is True
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(guarded(0.2, also_cancel=True))
    assert outcome["timed_out_True"] is False
    deadlines.close()


async def test_close_stops_every_timer():
    deadlines = Deadlines()
    task = asyncio.ensure_future(_sleeper(0.3))
    watch = deadlines.watch(task, 0.1)
    deadlines.close()
    await task  # not cancelled: its slice's timer was stopped
    assert not watch.expired
