"""Store schema 4: the per-request log — writes in batches, windows oldest first,
retention by rows and age, usage per version, the upgrade from schema 3."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import state.migrations as migrations
from state import RequestEntry, RequestRow, RequestUsage, Store, StoreError

CHAT = "/v1/chat/completions"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "routerd.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    opened = Store.open(db_path, clock=lambda: 1_000.0)
    yield opened
    opened.close()


def row(ts: float, model: str | None = "m", version: str | None = "1", **fields) -> RequestRow:
    values = {
        "tenant": None,
        "endpoint": CHAT,
        "status": 200,
        "error": None,
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "waited_ms": None,
        "duration_ms": 12.5,
        "stream_failed": False,
        **fields,
    }
    return RequestRow(ts=ts, model=model, version=version, **values)


def test_round_trip_keeps_every_field(store: Store) -> None:
    written = RequestRow(
        ts=1_700_000_000.25,
        tenant=None,
        model="llama",
        version="2",
        endpoint="/v1/completions",
        status=200,
        error="server_error",
        prompt_tokens=7,
        completion_tokens=11,
        waited_ms=830.5,
        duration_ms=1234.5,
        stream_failed=True,
    )
    plain = (1_700_000_001.0, None, None, None, "/v1/embeddings", 404, "model_not_found", 0, 0)
    store.record_requests([written, (*plain, None, 0.5, False)])
    first, second = store.requests()
    assert isinstance(first, RequestEntry)
    assert (first.ts, first.model, first.version, first.endpoint, first.status) == (
        1_700_000_000.25,
        "llama",
        "2",
        "/v1/completions",
        200,
    )
    assert (first.error, first.prompt_tokens, first.completion_tokens) == ("server_error", 7, 11)
    assert (first.waited_ms, first.duration_ms, first.stream_failed) == (830.5, 1234.5, True)
    assert first.tenant is None and first.model_id == "llama@2" and first.failed
    assert (second.model, second.version, second.model_id, second.waited_ms) == (None,) * 4
    assert (second.status, second.error, second.stream_failed) == (404, "model_not_found", False)
    assert not second.failed
    assert second.id > first.id


def test_oldest_first_by_arrival_then_id_within_bounds(store: Store) -> None:
    # Rows are written as requests finish, not in the order they arrived.
    store.record_requests([row(30.0, "c"), row(10.0, "a"), row(20.0, "b1")])
    store.record_requests([row(20.0, "b2"), row(40.0, "d")])
    assert [e.model for e in store.requests()] == ["a", "b1", "b2", "c", "d"]
    assert [e.model for e in store.requests(since=20.0)] == ["b1", "b2", "c", "d"]
    assert [e.model for e in store.requests(until=30.0)] == ["a", "b1", "b2"]
    assert [e.model for e in store.requests(since=20.0, until=40.0)] == ["b1", "b2", "c"]
    assert [e.model for e in store.requests(since=15.0, limit=2)] == ["b1", "b2"]
    assert store.requests(since=41.0) == []
    with pytest.raises(ValueError, match="limit"):
        store.requests(limit=0)
    with pytest.raises(ValueError, match="since"):
        store.requests(since=math.nan)


def test_iter_requests_pages_through_the_same_rows(store: Store) -> None:
    # Equal arrival times across page boundaries must neither repeat nor skip a row.
    store.record_requests([row(float(i // 3), f"m{i}") for i in range(20)])
    assert [e.id for e in store.iter_requests(batch=4)] == [e.id for e in store.requests()]
    window = [e.model for e in store.iter_requests(since=2.0, until=5.0, batch=2)]
    assert window == [e.model for e in store.requests(since=2.0, until=5.0)]
    assert window == [f"m{i}" for i in range(6, 15)]
    assert list(store.iter_requests(since=100.0)) == []
    with pytest.raises(ValueError, match="batch"):
        next(store.iter_requests(batch=0))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"ts": math.nan}, "ts must be a finite number"),
        ({"status": True}, "status must be an HTTP status"),
        ({"status": 42}, "status must be an HTTP status"),
        ({"prompt_tokens": -1}, "prompt_tokens must not be negative"),
        ({"completion_tokens": "5"}, "completion_tokens must be an integer"),
        ({"waited_ms": -3.0}, "waited_ms must be a finite, non-negative number"),
        ({"duration_ms": math.inf}, "duration_ms must be a finite, non-negative number"),
        ({"endpoint": ""}, "endpoint must be a non-empty string"),
        ({"model": 7}, "model must be a string or None"),
        ({"error": b"x"}, "error must be a string or None"),
        ({"stream_failed": 1}, "stream_failed must be a boolean"),
    ],
)
def test_a_bad_row_is_refused_and_nothing_is_written(
    store: Store, bad: dict[str, object], message: str
) -> None:
    good = row(1.0)
    with pytest.raises(ValueError, match=f"request row 1: {message}"):
        store.record_requests([good, good._replace(**bad), good])
    assert store.requests() == []
    with pytest.raises(ValueError, match="request row 0: a request row is a tuple of 12"):
        store.record_requests([(1.0, None, "m")])  # type: ignore[list-item]
    store.record_requests([])  # nothing to do, no transaction
    store.record_requests([good])
    assert len(store.requests()) == 1


def test_prune_by_age_then_by_rows_oldest_arrival_first(store: Store) -> None:
    store.record_requests([row(float(ts)) for ts in (50, 10, 40, 20, 30, 60)])
    assert store.prune_requests(max_rows=0, max_age=math.inf, now=100.0) == 0
    assert store.prune_requests(max_rows=0, max_age=75.0, now=100.0) == 2  # before 25
    assert [e.ts for e in store.requests()] == [30.0, 40.0, 50.0, 60.0]
    assert store.prune_requests(max_rows=3, max_age=math.inf, now=100.0) == 1
    assert [e.ts for e in store.requests()] == [40.0, 50.0, 60.0]
    assert store.prune_requests(max_rows=3, max_age=math.inf, now=100.0) == 0
    # Both at once: age first, then rows among what is left.
    store.record_requests([row(70.0), row(70.0), row(5.0)])
    deleted = store.prune_requests(max_rows=2, max_age=55.0, now=100.0)  # age: 5, 40
    assert deleted == 4
    kept = store.requests()
    assert [e.ts for e in kept] == [70.0, 70.0] and kept[0].id < kept[1].id


def test_prune_by_rows_breaks_ties_on_arrival_by_id(store: Store) -> None:
    store.record_requests([row(1.0, f"m{i}") for i in range(5)])
    assert store.prune_requests(max_rows=2, max_age=math.inf, now=10.0) == 3
    assert [e.model for e in store.requests()] == ["m3", "m4"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_rows": -1}, "max_rows"),
        ({"max_rows": True}, "max_rows"),
        ({"max_age": 0}, "max_age"),
        ({"max_age": math.nan}, "max_age"),
        ({"now": math.inf}, "now"),
    ],
)
def test_prune_refuses_bad_limits(store: Store, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"max_rows": 10, "max_age": 60.0, "now": 100.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        store.prune_requests(**args)  # type: ignore[arg-type]


def test_usage_adds_up_per_version(store: Store) -> None:
    store.record_requests(
        [
            row(1.0, "a", "1", prompt_tokens=10, completion_tokens=20, waited_ms=100.0),
            row(2.0, "a", "1", prompt_tokens=1, completion_tokens=2),
            row(3.0, "a", "1", status=503, error="model_load_failed", waited_ms=300.0),
            row(4.0, "a", "1", stream_failed=True, error="server_error"),
            row(5.0, "a", "1", status=400, error="invalid_request_error"),
            row(6.0, "a", "2", prompt_tokens=4, completion_tokens=0),
            row(7.0, None, None, status=404, error="model_not_found", prompt_tokens=0),
            row(8.0, "b", "1", status=429, error="queue_full", prompt_tokens=0),
        ]
    )
    usage = {(u.model, u.version): u for u in store.request_usage()}
    assert list(usage) == [("a", "1"), ("a", "2"), ("b", "1"), (None, None)]
    a1 = usage["a", "1"]
    assert a1 == RequestUsage(
        model="a",
        version="1",
        requests=5,
        errors=2,
        rejected=1,
        prompt_tokens=10 + 1 + 3 + 3 + 3,
        completion_tokens=20 + 2 + 5 + 5 + 5,
        cold_starts=2,
        mean_waited_ms=200.0,
    )
    assert a1.error_rate == pytest.approx(0.4)
    assert (usage["a", "2"].errors, usage["a", "2"].cold_starts) == (0, 0)
    assert usage["a", "2"].mean_waited_ms is None and usage["a", "2"].error_rate == 0.0
    assert (usage[None, None].requests, usage[None, None].rejected) == (1, 1)
    assert (usage["b", "1"].rejected, usage["b", "1"].errors) == (1, 0)
    recent = store.request_usage(since=5.5)
    assert [(u.model, u.requests) for u in recent] == [("a", 1), ("b", 1), (None, 1)]
    assert store.request_usage(since=100.0) == []


def test_upgrade_from_schema_3_keeps_every_row(db_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:3])
        old = Store.open(db_path, clock=lambda: 1.0)
        assert old.schema_version == 3
        old.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO models (name, created_at) VALUES ('m', 1)")
        conn.execute(
            "INSERT INTO versions (name, version, backend, path, options, source, created_at, "
            "updated_at, state) VALUES ('m', '1', 'echo', '/m/1', '{}', 'api', 1, 1, 'active')"
        )
        conn.execute("INSERT INTO routes (name, version, weight) VALUES ('m', '1', 100)")
        conn.execute("INSERT INTO events (ts, kind, model, version) VALUES (3, 'load', 'm', '1')")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "request_log" not in tables
    new = Store.open(db_path, clock=lambda: 2.0)
    try:
        assert new.schema_version == 4
        assert [r.model_id for r in new.list_versions()] == ["m@1"]
        assert new.route("m").weights == {"1": 100}
        assert [e.kind for e in new.events()] == ["load"]
        new.record_requests([row(5.0, "m", "1")])
        assert [e.model_id for e in new.requests()] == ["m@1"]
    finally:
        new.close()
    with sqlite3.connect(db_path) as conn:
        applied = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert applied[-1] == (4, "request_log", 2.0)
    assert "request_log_ts" in indexes


def test_a_short_busy_timeout_fails_fast_and_leaves_the_store_as_it_was(
    store: Store, db_path: Path
) -> None:
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process mid-write
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"recording 1 requests failed: .* locked .*0\.01 s"):
            store.record_requests([row(1.0)], busy_timeout=0.01)
        with pytest.raises(StoreError, match=r"pruning the request log failed: .* locked"):
            store.prune_requests(max_rows=1, max_age=math.inf, now=1.0, busy_timeout=0.0)
        assert time.monotonic() - started < 2.0  # the store's own wait is 5 s
        assert store.requests() == []  # readers are not blocked (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with sqlite3.connect(db_path) as conn:  # what the next connection would see is untouched
        assert conn.execute("SELECT COUNT(*) FROM request_log").fetchone()[0] == 0
    assert store._db is not None
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000  # back to its own
    store.record_requests([row(1.0)], busy_timeout=0.01)
    assert len(store.requests()) == 1


def test_closed_store_refuses_the_request_log(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="is closed"):
        store.record_requests([row(1.0)], busy_timeout=0.01)
    with pytest.raises(StoreError, match="is closed"):
        store.record_requests([row(1.0)])
    with pytest.raises(StoreError, match="is closed"):
        store.requests()
