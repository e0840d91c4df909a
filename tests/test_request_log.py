"""The request log in memory: one row per request, written in batches on its clock,
kept (bounded) while the database is locked, pruned by the configured retention."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from routerd.clock import VirtualClock
from routerd.config import RequestLogConfig
from routerd.request_context import RequestContext, StreamSlots
from routerd.request_log import CANCELLED, ENDPOINTS, WRITE_WAIT, RequestLog
from state import RequestTuple, Store, StoreError, VersionRecord, check_request_row

CHAT = "/v1/chat/completions"


class FakeStore:
    """The two writes the log makes, recorded; ``locked`` failed writes to come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[RequestTuple] = []
        self.writes: list[tuple[int, float | None]] = []  # (rows, busy_timeout) of each try
        self.prunes: list[tuple[int, float, float]] = []
        self.locked = 0

    def record_requests(
        self, rows: Sequence[RequestTuple], *, busy_timeout: float | None = None
    ) -> None:
        self.writes.append((len(rows), busy_timeout))
        if self.locked:
            self.locked -= 1
            raise StoreError("recording requests failed: routerd.db is locked")
        for index, row in enumerate(rows):  # as the store checks them
            try:
                check_request_row(row)
            except ValueError as exc:
                raise ValueError(f"request row {index}: {exc}") from None
        self.rows.extend(rows)

    def prune_requests(
        self, *, max_rows: int, max_age: float, now: float, busy_timeout: float | None = None
    ) -> int:
        if self.locked:
            self.locked -= 1
            raise StoreError("pruning the request log failed: routerd.db is locked")
        self.prunes.append((max_rows, max_age, now))
        return 2


def version(name: str = "m", number: str = "1") -> VersionRecord:
    return VersionRecord(name, number, "fake", "/models/m", {}, "api", 0.0, 0.0)


def context(model: str | None = "m", **notes: object) -> RequestContext:
    made = RequestContext(time.monotonic(), StreamSlots(4))
    made.served = None if model is None else version(model)
    for name, value in notes.items():
        setattr(made, name, value)
    return made


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    return FakeStore(tmp_path / "routerd.db")


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def request_log(
    store: FakeStore, clock: VirtualClock, *, max_buffer: int = 100, **config: object
) -> RequestLog:
    return RequestLog(store, RequestLogConfig(**config), clock=clock, max_buffer=max_buffer)  # type: ignore[arg-type]


def test_a_row_is_what_the_request_noted(store: FakeStore, clock: VirtualClock) -> None:
    log = request_log(store, clock)
    served = context(usage=(7, 11), cold_start_ms=830.0)
    before = time.time()
    log.add(served, CHAT, 200)
    log.add(context(None, error="model_not_found"), "/v1/completions", 404)
    log.add(context(stream_failed=True, error="server_error"), CHAT, 200)
    assert (log.pending, store.rows) == (3, [])  # nothing written on the request path
    assert log.flush() == 3
    assert log.pending == 0
    first, unknown, failed = store.rows
    ts, tenant, model, ver, endpoint, status, error, p, c, waited, took, stream_failed = first
    assert served.arrived <= before and before - ts < 5  # when it arrived, on the wall clock
    assert (tenant, model, ver, endpoint, status, error) == (None, "m", "1", CHAT, 200, None)
    assert (p, c, waited, stream_failed) == (7, 11, 830.0, False)
    assert 0 <= took < 5_000
    assert unknown[2:9] == (None, None, "/v1/completions", 404, "model_not_found", 0, 0)
    assert unknown[9] is None
    assert (failed[5], failed[6], failed[11]) == (200, "server_error", True)
    assert store.writes == [(3, WRITE_WAIT)]  # one write, not waiting long for a lock
    assert log.flush() == 0 and len(store.writes) == 1  # nothing buffered: no write


def test_a_cancelled_request_is_499(store: FakeStore, clock: VirtualClock) -> None:
    log = request_log(store, clock)
    log.add(context(error=CANCELLED), CHAT, 500)  # a caller that left the status as it was
    log.flush()
    assert store.rows[0][5:7] == (499, "cancelled")


def test_a_locked_database_keeps_the_rows_for_the_next_flush(
    store: FakeStore, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = request_log(store, clock)
    for tokens in range(3):
        log.add(context(usage=(tokens, 0)), CHAT, 200)
    store.locked = 2
    with caplog.at_level(logging.INFO, logger="routerd.request_log"):
        assert log.flush() == 0
        log.add(context(usage=(3, 0)), CHAT, 200)
        assert log.flush() == 0
        assert log.pending == 4 and store.rows == []
        assert log.flush() == 4
    assert [row[7] for row in store.rows] == [0, 1, 2, 3]  # none lost, in order
    assert log.pending == 0 and log.dropped == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("kept for the next try" in m for m in messages) == 1  # once per outage
    assert any("written again" in m for m in messages)


def test_the_buffer_is_bounded_dropping_the_oldest(
    store: FakeStore, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = request_log(store, clock, max_buffer=3)
    store.locked = 1
    for tokens in range(5):
        log.add(context(usage=(tokens, 0)), CHAT, 200)
    assert (log.pending, log.dropped) == (3, 2)
    with caplog.at_level(logging.WARNING, logger="routerd.request_log"):
        assert log.flush() == 0  # still locked
        log.add(context(usage=(5, 0)), CHAT, 200)
        assert log.flush() == 3
    assert [row[7] for row in store.rows] == [3, 4, 5]  # the newest kept
    assert log.dropped == 3
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert warnings == [
        "request log full (3 rows waiting): dropped the 2 oldest, 2 in all",
        "request log full (3 rows waiting): dropped the 1 oldest, 3 in all",
    ]


def test_a_malformed_row_is_dropped_and_the_rest_written(
    store: FakeStore, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    log = request_log(store, clock)
    log.add(context(usage=(1, 0)), CHAT, 200)
    log.add(context(usage=(-5, 0)), CHAT, 200)  # a bug: negative tokens
    log.add(context(usage=(3, 0)), CHAT, 200)
    with caplog.at_level(logging.ERROR, logger="routerd.request_log"):
        assert log.flush() == 2
    assert [row[7] for row in store.rows] == [1, 3]
    assert log.pending == 0
    assert "dropped 1 malformed rows" in caplog.text and "prompt_tokens" in caplog.text


async def test_the_flusher_writes_and_prunes_on_its_clock(
    store: FakeStore, clock: VirtualClock
) -> None:
    log = RequestLog(
        store,  # type: ignore[arg-type]
        RequestLogConfig(max_rows=10, max_age=3600.0, flush_interval=2.0),
        clock=clock,
        prune_interval=60.0,
    )
    log.start()
    log.start()  # idempotent
    log.add(context(), CHAT, 200)
    await clock.advance(1.9)
    assert store.rows == [] and store.prunes == []
    await clock.advance(0.1)
    assert len(store.rows) == 1
    assert store.prunes == [(10, 3600.0, clock.wall())]  # the first round prunes
    log.add(context(), CHAT, 200)
    await clock.advance(2.0)
    assert len(store.rows) == 2 and len(store.prunes) == 1  # pruning waits its minute
    await clock.advance(58.0)
    assert len(store.prunes) == 2
    log.configure(RequestLogConfig(max_rows=5, max_age=math.inf, flush_interval=0.5))
    await clock.advance(2.0)  # the wait begun under the old interval runs out first
    log.add(context(), CHAT, 200)
    await clock.advance(0.5)
    assert len(store.rows) == 3
    log.add(context(), CHAT, 200)
    await log.close()
    assert len(store.rows) == 4 and store.writes[-1] == (1, None)  # at shutdown: the store's wait
    assert clock.pending() == 0  # the flusher stopped
    await clock.advance(10.0)
    assert len(store.writes) == 4


async def test_a_failing_round_does_not_stop_the_flusher(
    store: FakeStore, clock: VirtualClock
) -> None:
    log = request_log(store, clock, flush_interval=1.0)
    log.start()
    store.locked = 2  # the first round's write and its prune both fail
    log.add(context(), CHAT, 200)
    await clock.advance(1.0)
    assert store.rows == [] and store.prunes == [] and log.pending == 1
    await clock.advance(1.0)
    assert len(store.rows) == 1
    await log.close()


def test_retention_without_limits_asks_nothing_of_the_store(
    store: FakeStore, clock: VirtualClock
) -> None:
    log = request_log(store, clock, max_rows=0, max_age=math.inf)
    assert log.prune() == 0 and store.prunes == []
    log.configure(RequestLogConfig(max_rows=0, max_age=60.0))
    assert log.prune() == 2 and store.prunes == [(0, 60.0, clock.wall())]
    store.locked = 1
    assert log.prune() == 0  # a locked database: next time


def test_off_records_nothing_until_turned_on(store: FakeStore, clock: VirtualClock) -> None:
    log = request_log(store, clock, enabled=False)
    assert log.endpoints == frozenset()
    log.configure(RequestLogConfig())
    assert log.endpoints == ENDPOINTS == {CHAT, "/v1/completions", "/v1/embeddings"}


async def test_close_never_raises_when_the_store_is_gone(
    tmp_path: Path, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    real = Store.open(tmp_path / "routerd.db")
    log = RequestLog(real, RequestLogConfig(), clock=clock)
    log.add(context(), CHAT, 200)
    real.close()
    with caplog.at_level(logging.ERROR, logger="routerd.request_log"):
        await log.close()
    assert "1 rows could not be written at shutdown" in caplog.text


async def test_with_the_real_store_rows_age_out_and_usage_adds_up(tmp_path: Path) -> None:
    real = Store.open(tmp_path / "routerd.db")
    try:
        log = RequestLog(
            real, RequestLogConfig(max_age=100.0), clock=VirtualClock(wall_start=2_000.0)
        )
        log.add(context(usage=(2, 3), cold_start_ms=40.0, arrived=1_000.0), CHAT, 200)
        log.add(context(arrived=1_950.0), CHAT, 503)
        log.add(context(usage=(1, 1), arrived=1_990.0), CHAT, 200)
        usage = await log.usage(since=None)  # flushes first; read on a thread of its own
        assert log.pending == 0
        assert [(u.model, u.requests, u.errors, u.cold_starts) for u in usage] == [("m", 3, 1, 1)]
        recent = await log.usage(since=1_900.0)
        assert [(u.requests, u.prompt_tokens, u.cold_starts) for u in recent] == [(2, 1, 0)]
        assert log.prune() == 1  # arrived before 2000 - 100
        assert [e.ts for e in real.requests()] == [1_950.0, 1_990.0]
    finally:
        real.close()
