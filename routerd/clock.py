"""The scheduler's one clock: it reads time and it drives every wait.

Every timeout, keep-alive, minimum residency, poll and back-off in the scheduler
goes through a ``Clock``: ``now`` to read, ``call_later`` / ``sleep`` / ``wait_for``
to wait. Nothing in the scheduler reads the wall clock or sleeps behind its back, so
the same code runs on real time in the daemon (``LoopClock``) and on virtual time in
tests and the simulator (``VirtualClock``), where a wait of an hour takes no time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Timer(Protocol):
    """A callback scheduled for later; ``cancel`` makes sure it never runs."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time for decisions, wall time for people, and timers on the event loop.

    ``now`` and ``wall`` may be read from any thread; the waits are made on the loop.
    """

    def now(self) -> float:
        """Monotonic seconds: what every deadline and idle time is measured in."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for status pages and stored records."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` on the event loop once ``delay`` seconds have passed."""
        ...

    async def sleep(self, delay: float) -> None:
        """Return once ``delay`` seconds have passed."""
        ...

    async def wait_for(self, awaitable: Awaitable[T], timeout: float) -> T:
        """``awaitable``'s result, or ``TimeoutError`` (and it cancelled) after ``timeout``."""
        ...


class TimerClock:
    """``sleep`` and ``wait_for`` built on ``call_later``, for both clocks below."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        raise NotImplementedError

    async def sleep(self, delay: float) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_later(delay, lambda: _resolve(waiter))
        try:
            await waiter
        finally:
            timer.cancel()

    async def wait_for(self, awaitable: Awaitable[T], timeout: float) -> T:
        task = asyncio.ensure_future(awaitable)
        if math.isinf(timeout):
            return await task
        expired = False

        def expire() -> None:
            nonlocal expired
            if not task.done():
                expired = True
                task.cancel()

        timer = self.call_later(max(timeout, 0.0), expire)
        try:
            return await task
        except asyncio.CancelledError:
            if expired:
                raise TimeoutError(f"timed out after {timeout:g}s") from None
            raise
        finally:
            timer.cancel()


class LoopClock(TimerClock):
    """Real time: ``time.monotonic`` and the running loop's timers.

    ``now`` and ``wall`` are the C functions themselves, not methods wrapping them:
    they are read several times per request, and a Python frame each time shows.
    """

    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(delay, 0.0), callback)


class _VirtualTimer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


SETTLE_TURNS = 64
"""Loop turns ``settle`` gives: enough for any chain of wake-ups the scheduler makes
(a timer wakes a waiter, which wakes a load, which wakes its requests)."""


async def settle(turns: int = SETTLE_TURNS) -> None:
    """Let every task that can run without time passing run (zero-length yields)."""
    for _ in range(turns):
        await asyncio.sleep(0)


class VirtualClock(TimerClock):
    """Time that moves only when told: ``advance`` fires due timers in order.

    Between two timers it lets the loop settle, so a task woken by one timer can set
    the next before time moves on. Work on other threads (an instance's executor) is
    not on this clock; tests wait for it with events, not with time.
    """

    def __init__(self, start: float = 1000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _VirtualTimer]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = _VirtualTimer(self._now + max(delay, 0.0), callback)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def pending(self) -> int:
        """How many live timers wait: a test can tell that a waiter has begun waiting."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_deadline(self) -> float | None:
        """When the earliest live timer is due, or None when nothing waits on time."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    async def advance(self, seconds: float) -> None:
        """Move ``seconds`` ahead, firing every timer due on the way, in order."""
        target = self._now + seconds
        await settle()
        while (due := self.next_deadline()) is not None and due <= target:
            _, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, timer.when)
            timer.callback()
            await settle()
        self._now = max(self._now, target)
        await settle()

    async def run_until_idle(self, limit: float) -> None:
        """Jump from timer to timer until none is left or ``limit`` seconds have passed."""
        end = self._now + limit
        await settle()
        while (due := self.next_deadline()) is not None and due <= end:
            await self.advance(due - self._now)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
