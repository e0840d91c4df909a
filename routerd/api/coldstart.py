"""Streams that must wait for a load: keep the connection alive with SSE comments.

A proxy in front of routerd (or the client itself) may drop a connection that stays
silent for long, and loading a large model can take minutes. So a streaming request
whose lease has not come after ``server.stream_heartbeat`` starts its event stream
early and sends a comment line — ignored by SSE clients — at that interval until the
model is ready::

    : loading demo-large@1 40%

Its status and headers are then sent before the instance is known, so the device and
the cold start travel as one more comment (``: served by demo-large@1 on cpu after
12345 ms``), and an error from then on (the load failed, the prompt is too long) is
an ``error`` event followed by ``[DONE]``, as for errors in mid-stream. Requests
served without waiting that long are answered exactly as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from aiohttp import web

from routerd.api.answers import fail_stream, open_stream, send_comment
from routerd.api.limits import streaming
from routerd.metrics import note_cold_start
from routerd.scheduler import Lease, Scheduler
from state import VersionRecord


class ColdStream:
    """One request's lease, taken with comments on the wire while it is slow to come."""

    def __init__(
        self, request: web.Request, record: VersionRecord, *, stream: bool, heartbeat: float
    ) -> None:
        self._request = request
        self._record = record
        self._stream = stream
        self._heartbeat = heartbeat
        self.response: web.StreamResponse | None = None  # set once comments began

    def lease(
        self, scheduler: Scheduler, *, keep_alive: float | None
    ) -> AbstractAsyncContextManager[Lease]:
        """The scheduler's lease; for a stream, one that sends comments while it waits."""
        context = scheduler.lease(
            self._record, keep_alive=keep_alive, client_gone=client_gone(self._request)
        )
        if not self._stream:
            return context  # nothing to keep alive: no extra layer on the common path
        return self._with_heartbeat(scheduler, context)

    @asynccontextmanager
    async def _with_heartbeat(
        self, scheduler: Scheduler, context: AbstractAsyncContextManager[Lease]
    ) -> AsyncIterator[Lease]:
        stack = AsyncExitStack()
        entering = asyncio.ensure_future(stack.enter_async_context(context))
        try:
            while not entering.done():
                await asyncio.wait([entering], timeout=self._heartbeat)
                if not entering.done():
                    await self._comment(
                        f"loading {self._record.model_id} {_percent(scheduler, self._record)}%"
                    )
        except BaseException:  # client gone or cancelled: give up the wait (or the lease)
            entering.cancel()
            await asyncio.wait([entering])
            await stack.aclose()
            raise
        async with stack:
            lease = entering.result()  # a failed load raises here
            if self.response is not None:
                cold = lease.cold_start_ms or 0.0
                note_cold_start(cold)
                await self._comment(
                    f"served by {self._record.model_id} on {lease.handle.device} "
                    f"after {cold:.0f} ms"
                )
            yield lease

    async def _comment(self, text: str) -> None:
        if self.response is None:
            self.response = await open_stream(
                self._request, {"x-routerd-model": self._record.model_id}
            )
            streaming(self.response)  # from now on a timeout is an SSE error event
        await send_comment(self.response, text)

    async def fail(self, exc: Exception) -> web.StreamResponse:
        """End a stream already begun with ``exc`` as an error event, then ``[DONE]``."""
        assert self.response is not None
        return await fail_stream(self.response, exc)


CONNECTION_POLL_S = 0.25
"""How often a request waiting for a load looks whether its client is still there."""


def client_gone(request: web.Request) -> Callable[[], Awaitable[None]]:
    """What the scheduler awaits beside a request's wait for a load: it returns once
    the client's connection closed. The web server tells a handler of that only when
    it next writes, and a request waiting for a load writes nothing, so this looks."""

    async def gone() -> None:
        while (transport := request.transport) is not None and not transport.is_closing():
            await asyncio.sleep(CONNECTION_POLL_S)

    return gone


def _percent(scheduler: Scheduler, record: VersionRecord) -> int:
    snapshot = scheduler.instance(record.model_id)
    if snapshot is None or snapshot.load_percent is None:
        return 0
    return snapshot.load_percent
