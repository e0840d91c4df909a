"""The per-request log: one row per request, kept in memory, written to SQLite in batches.

The request middleware (``routerd.api.middleware``) hands every finished request to
the OpenAI inference endpoints (``ENDPOINTS``) to :meth:`RequestLog.add`, which makes
one tuple of what the request's ``RequestContext`` noted — when it arrived, the
version that served it, its tokens, how long it waited for a load, whether its
stream failed, the error code — and appends it to a buffer: about a microsecond, on
a request path whose own work is tens of microseconds. Nothing is written then.

A background task writes the buffer every ``flush_interval`` with
``Store.record_requests`` (one transaction) and applies the retention
(``Store.prune_requests``: rows and age) every ``prune_interval``; ``close`` writes
what is left at shutdown. The writes run on the event loop, like every store call,
but wait at most ``WRITE_WAIT`` for a lock another process holds: a locked database
keeps the rows for the next flush instead of stalling the loop. At most
``max_buffer`` rows wait; beyond that the oldest are dropped, and a warning counts
them. No request ever waits for the log or fails because of it.

``usage`` adds the log up per version (``Store.request_usage``) on a thread of its
own, over a connection of its own, since it reads every row in its window.

The rows are the record the simulator replays (``Store.iter_requests``), and the
usage and error rates operators read (``routerctl usage``): there is no second log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Protocol

from routerd.clock import Clock
from routerd.config import RequestLogConfig
from routerd.request_context import RequestContext, current
from state import RequestTuple, RequestUsage, Store, StoreError, check_request_row

log = logging.getLogger("routerd.request_log")

ENDPOINTS: Final = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
"""The routes whose requests are recorded: the OpenAI inference endpoints."""

CANCELLED: Final = "cancelled"
"""The error of a request cancelled before it was answered (its client left, or the
daemon stopped); it is recorded with status ``CANCELLED_STATUS``."""
CANCELLED_STATUS: Final = 499

WRITE_WAIT: Final = 0.01
"""Seconds a periodic write waits for another process's lock before trying again at
the next flush (the store's own busy timeout is seconds: too long for the loop)."""
PRUNE_INTERVAL: Final = 60.0
MAX_BUFFER: Final = 100_000


def note_error(code: str | None, message: str | None = None) -> None:
    """Called where an error becomes the answer (``routerd.api.errors``) or a stream's
    error event (``routerd.api.answers``): its OpenAI code, else its type, and what it
    said (for the request's log line)."""
    context = current()
    if context is not None:
        context.error = code
        context.error_message = message


def note_client_gone() -> None:
    """The client closed its connection before the whole answer was sent: the request
    ends as 499 ``cancelled`` (logged at info, never an error of the version)."""
    note_error(CANCELLED, "the client closed the connection")


class RequestStore(Protocol):
    """What the log needs of the store (``state.Store``; tests give a fake)."""

    @property
    def path(self) -> Path: ...

    def record_requests(
        self, rows: Sequence[RequestTuple], *, busy_timeout: float | None = None
    ) -> None: ...

    def prune_requests(
        self, *, max_rows: int, max_age: float, now: float, busy_timeout: float | None = None
    ) -> int: ...


class RequestLog:
    """The buffer, its flusher and the retention (see the module docstring).

    ``clock`` drives the periodic wait (``LoopClock`` in the daemon, ``VirtualClock``
    in tests) and gives the wall time retention is measured from. ``max_buffer`` and
    ``prune_interval`` are fixed at construction; the rest follows the config
    (``configure``, on reload).
    """

    def __init__(
        self,
        store: RequestStore,
        config: RequestLogConfig,
        *,
        clock: Clock,
        max_buffer: int = MAX_BUFFER,
        prune_interval: float = PRUNE_INTERVAL,
    ) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be positive, got {max_buffer}")
        self._store = store
        self._clock = clock
        self._rows: deque[RequestTuple] = deque(maxlen=max_buffer)
        self._max_buffer = max_buffer
        self._prune_interval = prune_interval
        self._next_prune = -math.inf  # the first round prunes: retention may have shrunk
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0  # rows dropped, the oldest first, while the buffer was full
        self._dropped_reported = 0
        self._failing = False  # the last write failed (logged once until one succeeds)
        self.configure(config)

    def configure(self, config: RequestLogConfig) -> None:
        """Apply ``[request_log]`` (at start and on reload): on or off, retention, and
        the flush interval (from the next wait on; the current one runs out first)."""
        self.config = config
        # What the middleware checks each request's endpoint against: empty when off.
        self.endpoints: frozenset[str] = ENDPOINTS if config.enabled else frozenset()

    # -- the request path ------------------------------------------------------------

    def add(self, context: RequestContext, endpoint: str, status: int) -> None:
        """Buffer one finished request (the middleware calls this, after its metrics)."""
        served = context.served
        usage = context.usage
        error = context.error
        row = (
            context.arrived,
            None,  # tenant: none until tenants exist
            None if served is None else served.name,
            None if served is None else served.version,
            endpoint,
            CANCELLED_STATUS if error == CANCELLED else status,
            error,
            0 if usage is None else usage[0],
            0 if usage is None else usage[1],
            context.cold_start_ms,
            (time.monotonic() - context.started) * 1000.0,
            context.stream_failed,
        )
        rows = self._rows
        if len(rows) == self._max_buffer:
            self.dropped += 1  # the deque drops its oldest row to take this one
        rows.append(row)

    @property
    def pending(self) -> int:
        """Rows buffered, not written yet."""
        return len(self._rows)

    # -- writing ---------------------------------------------------------------------

    def flush(self, *, busy_timeout: float | None = WRITE_WAIT) -> int:
        """Write the buffered rows in one transaction; return how many were written.

        A ``StoreError`` (locked, disk full) keeps them for the next flush. A row the
        store refuses as malformed (a bug) is dropped with an error, and the rest are
        written. ``busy_timeout`` None waits as long as the store does (at shutdown).
        """
        self._report_dropped()
        rows = self._rows
        if not rows:
            return 0
        try:
            written = self._write(list(rows), busy_timeout)
        except StoreError as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "request log not written, kept for the next try: %s",
                    exc,
                    extra={"event": "request_log_unwritten", "rows": len(rows)},
                )
            return 0
        rows.clear()  # nothing was appended meanwhile: the write ran on this thread
        if self._failing:
            self._failing = False
            log.info("request log written again", extra={"rows": written})
        return written

    def _write(self, batch: list[RequestTuple], busy_timeout: float | None) -> int:
        record = self._store.record_requests
        try:
            record(batch, busy_timeout=busy_timeout)
            return len(batch)
        except ValueError as exc:
            kept = _well_formed(batch, exc)
        try:
            record(kept, busy_timeout=busy_timeout)
        except ValueError:
            log.exception("request log: dropped %d rows the store refused", len(kept))
            return 0
        return len(kept)

    def prune(self) -> int:
        """Apply the retention now; return how many rows were deleted (0 if it failed)."""
        config = self.config
        if not config.max_rows and math.isinf(config.max_age):
            return 0
        try:
            deleted = self._store.prune_requests(
                max_rows=config.max_rows,
                max_age=config.max_age,
                now=self._clock.wall(),
                busy_timeout=WRITE_WAIT,
            )
        except StoreError as exc:
            log.warning("request log retention not applied this time: %s", exc)
            return 0
        if deleted:
            log.debug("request log pruned", extra={"rows": deleted})
        return deleted

    def tick(self) -> None:
        """One round of the background task: flush, and prune when it is due."""
        try:
            self.flush()
            now = self._clock.now()
            if now >= self._next_prune:
                self._next_prune = now + self._prune_interval
                self.prune()
        except Exception:  # a bug must not end the task: requests would pile up unwritten
            log.exception("request log: flush failed")

    def _report_dropped(self) -> None:
        new = self.dropped - self._dropped_reported
        if new:
            self._dropped_reported = self.dropped
            log.warning(
                "request log full (%d rows waiting): dropped the %d oldest, %d in all",
                self._max_buffer,
                new,
                self.dropped,
                extra={"event": "request_log_dropped"},
            )

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="request log")

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self.config.flush_interval)
            self.tick()

    async def close(self) -> None:
        """Stop the flusher and write what is left, waiting for a lock as the store does.
        Never raises: shutdown goes on without the rows if the database cannot take them."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.flush(busy_timeout=None)
        if self._rows:
            log.error("request log: %d rows could not be written at shutdown", len(self._rows))

    # -- reading ---------------------------------------------------------------------

    async def usage(self, *, since: float | None) -> list[RequestUsage]:
        """``Store.request_usage`` over what is written and what is buffered (flushed
        first), read on a thread with its own connection: on a large log that takes
        seconds, which the loop must not wait for."""
        self.flush()
        return await asyncio.to_thread(_read_usage, self._store.path, since)


def _read_usage(path: Path, since: float | None) -> list[RequestUsage]:
    reader = Store.open(path)  # this thread's own store: a store belongs to one thread
    try:
        return reader.request_usage(since=since)
    finally:
        reader.close()


def _well_formed(rows: list[RequestTuple], refused: ValueError) -> list[RequestTuple]:
    """The rows the store takes; the others are dropped, with one error line."""
    kept = []
    for row in rows:
        try:
            check_request_row(row)
        except ValueError:
            continue
        kept.append(row)
    log.error(
        "request log: dropped %d malformed rows (%s)", len(rows) - len(kept), refused, exc_info=True
    )
    return kept
