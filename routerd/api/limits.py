"""Per-request limits of the OpenAI API: a deadline and a cap on open streams.

- **Deadline** (``server.request_timeout``): a request still unanswered when it runs
  out gets 504 — or, when its stream has already begun, an ``error`` event and
  ``[DONE]``. Running out cancels the handler, and cancellation reaches the work: a
  generation's row is told to stop and is awaited before the lease is released
  (``routerd.instance_handle``), so the model's thread is never left computing for a
  client that has been answered.
- **Streams** (``server.max_streams``): a streaming request over the cap gets 429 with
  Retry-After before it takes a lease, so slow readers cannot hold every instance.

The limits of one request live on its ``RequestContext`` (``routerd.request_context``),
current while :func:`within_limits` (called by the request middleware,
``routerd.api.middleware``) runs the handler in the same task.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from routerd.api.answers import fail_stream
from routerd.api.errors import Handler
from routerd.errors import GatewayTimeout, TooManyStreams
from routerd.request_context import RequestContext, StreamSlots, current

STREAM_SLOTS = web.AppKey("stream_slots", StreamSlots)


def claim_stream() -> None:
    """Take a stream slot for the current request, or raise 429 if none is free."""
    context = current()
    if context is None or context.stream_claimed:
        return
    slots = context.slots
    if slots.open >= slots.limit:
        raise TooManyStreams(
            f"{slots.limit} streams are open, the most routerd serves at once; retry shortly",
            retry_after=1,
        )
    slots.open += 1
    context.stream_claimed = True


def streaming(response: web.StreamResponse) -> None:
    """Note that the current request's stream has begun (its status is sent)."""
    context = current()
    if context is not None:
        context.stream = response


class Deadlines:
    """Request deadlines, watched by one timer per time slice rather than one per request.

    ``asyncio.timeout`` arms and cancels a loop timer for every request, which on a
    busy daemon costs more than the rest of the limits together. Here a request joins
    the slice its deadline falls in (slices are ``min(50 ms, timeout / 4)`` wide), each
    slice has one timer, and a request that finishes first just leaves its slice. When
    a slice's timer fires, every request still in it is marked expired and its task
    cancelled; ``within_limits`` turns that cancellation into the 504. A deadline is
    thus never early and at most one slice late.
    """

    def __init__(self) -> None:
        self._slices: dict[float, dict[_Watch, None]] = {}
        self._timers: dict[float, asyncio.TimerHandle] = {}

    def watch(self, task: asyncio.Task[object], timeout: float) -> _Watch:
        loop = asyncio.get_running_loop()
        width = min(_MAX_SLICE_S, timeout / 4)
        fires_at = math.ceil((loop.time() + timeout) / width) * width
        watch = _Watch(task, fires_at, task.cancelling())
        members = self._slices.get(fires_at)
        if members is None:
            members = self._slices[fires_at] = {}
            self._timers[fires_at] = loop.call_at(fires_at, self._expire, fires_at)
        members[watch] = None
        return watch

    def forget(self, watch: _Watch) -> None:
        members = self._slices.get(watch.fires_at)
        if members is not None:
            members.pop(watch, None)

    def close(self) -> None:
        """Stop every timer (the app is shutting down)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._slices.clear()

    def _expire(self, fires_at: float) -> None:
        self._timers.pop(fires_at, None)
        for watch in self._slices.pop(fires_at, {}):
            watch.expired = True
            watch.task.cancel()


_MAX_SLICE_S = 0.05


class _Watch:
    __slots__ = ("cancelling", "expired", "fires_at", "task")

    def __init__(self, task: asyncio.Task[object], fires_at: float, cancelling: int) -> None:
        self.task = task
        self.fires_at = fires_at
        self.cancelling = cancelling  # cancellations requested before the watch began
        self.expired = False

    def timed_out(self) -> bool:
        """Whether the cancellation being handled is the deadline's (and no one else's)."""
        return self.expired and self.task.uncancel() <= self.cancelling


DEADLINES = web.AppKey("deadlines", Deadlines)


async def within_limits(
    request: web.Request,
    handler: Handler,
    context: RequestContext,
    *,
    timeout: float,
    deadlines: Deadlines,
) -> web.StreamResponse:
    """Run an OpenAI POST under its deadline and stream cap (other requests: as they are).

    ``context`` is the request's (current while the handler runs); its stream slot,
    if the handler took one, is given back when the handler ends.
    """
    if request.method != "POST" or not request.path.startswith("/v1/"):
        return await handler(request)
    task = asyncio.current_task()
    assert task is not None  # aiohttp serves every request in a task of its own
    watch = deadlines.watch(task, timeout)
    try:
        response = await handler(request)
        if watch.expired:
            watch.task.uncancel()  # the handler swallowed the deadline's cancellation
        return response
    except asyncio.CancelledError:
        if not watch.timed_out():
            raise  # the client left, or the daemon is stopping
        message = f"the request did not finish within {timeout:g}s"
        if not isinstance(context.stream, web.StreamResponse):  # not begun: still a status
            raise GatewayTimeout(message) from None
        context.stream_failed = True  # answered 200, ends with an error event: failed
        return await fail_stream(context.stream, GatewayTimeout(message))
    finally:
        deadlines.forget(watch)
        context.release_stream()
