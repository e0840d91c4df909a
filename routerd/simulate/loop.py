"""Virtual time for the simulator: an event loop whose clock jumps, and whose
"threads" are time on that clock.

``VirtualTimeLoop`` is asyncio's own selector loop with two things replaced:

- its ``time()`` is a number that moves only when the loop would otherwise wait:
  when nothing is ready, the selector jumps the clock to the next timer instead of
  sleeping. Every ``call_later``, ``asyncio.sleep`` and timeout the scheduler makes
  runs in order, at its virtual time, at the speed Python can go;
- ``run_in_executor`` runs the work at once, on the loop, and resolves its future
  after the virtual time the work said it takes (``takes``). The scheduler awaits a
  future that completes later, as it would with an instance's thread, so its code is
  untouched; only the hardware under it is simulated.

``LoopTimeClock`` is the scheduler's ``Clock`` over that loop: its ``now`` is the
loop's time, its timers the loop's timers (no second timer heap to drive).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable
from typing import Any, TypeVar

from routerd.clock import Timer, TimerClock

T = TypeVar("T")


class Stalled(RuntimeError):
    """Nothing is ready and no timer is set, yet the simulation has not finished:
    something waits for an event that no simulated time will bring."""


class _JumpingSelector(selectors.DefaultSelector):
    """A selector that, asked to wait, moves the loop's clock instead of sleeping.

    It never polls the file descriptors registered with it (the loop's own wake-up
    pipe): nothing in a simulation runs on another thread, and a callback another
    thread schedules is queued on the loop whether or not the pipe is read."""

    def __init__(self, loop_time: list[float]) -> None:
        super().__init__()
        self._time = loop_time

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Stalled("the simulation waits for something no timer will bring")
        self._time[0] += timeout
        return []


class InlineWorkLoop(asyncio.SelectorEventLoop):
    """An event loop whose executor work runs at once, on the loop, and then lasts as
    long as the work says (``takes``); what the work does at its end (``then``: memory
    given back) happens when that time is up. Cancelling the task that awaits work
    abandons its result, not the work, as with a real thread.

    The time is the loop's own (``_after``); a loop whose time is another clock's
    (the invariant tests' worlds) says so by overriding ``_after``."""

    def __init__(self, selector: selectors.BaseSelector | None = None) -> None:
        super().__init__(selector=selector)
        self._cost = 0.0
        self._then: list[Callable[[], None]] = []

    def takes(self, seconds: float, then: Callable[[], None] | None = None) -> None:
        """Called by work while it runs: how long it lasts, and what happens at its end
        (memory given back, say). Outside executor work it only adds to the next one."""
        self._cost += max(seconds, 0.0)
        if then is not None:
            self._then.append(then)

    def _after(self, seconds: float, callback: Callable[[], None]) -> None:
        self.call_later(seconds, callback)

    def run_in_executor(  # type: ignore[override]
        self, executor: Any, func: Callable[..., T], *args: Any
    ) -> Any:
        self._cost, self._then = 0.0, []
        future: asyncio.Future[T] = self.create_future()
        outcome: Any
        try:
            outcome, failed = func(*args), False
        except Exception as exc:
            outcome, failed = exc, True
        then, self._then = self._then, []

        def finish() -> None:
            for effect in then:
                effect()
            if future.done():  # abandoned
                return
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        if self._cost > 0:
            self._after(self._cost, finish)
        else:
            self.call_soon(finish)
        return future


class VirtualTimeLoop(InlineWorkLoop):
    """An ``InlineWorkLoop`` on virtual time (see the module docstring)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = [start]
        super().__init__(selector=_JumpingSelector(self._now))

    def time(self) -> float:
        return self._now[0]


class LoopTimeClock(TimerClock):
    """The scheduler's clock on a ``VirtualTimeLoop``: the loop's time and timers.

    ``wall`` is ``wall_start`` plus the virtual seconds gone, so stored events carry
    times that read as the trace's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, wall_start: float = 0.0) -> None:
        self._loop = loop
        self._wall_offset = wall_start - loop.time()

    def now(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return self._loop.time() + self._wall_offset

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_later(max(delay, 0.0), callback)
