"""The per-request log: one row per request to the OpenAI inference endpoints (schema 4).

Each row says when a request arrived (wall-clock seconds), for which tenant (none
yet), which model version served it (none when it never reached one: an unknown
model, a body that did not parse), on which endpoint, how it ended (the final HTTP
status, the OpenAI error code of a failure, ``stream_failed`` for a stream that
answered 200 and then ended with an error event), its tokens, how long it waited for
a load or a wake-up before its lease (``waited_ms``; NULL when its model was ready,
or when no lease came: a load that failed) and how long it took in all. One record
serves three uses: replaying a host's own traffic in the simulator (``requests`` /
``iter_requests``, oldest first), usage accounting and error rates
(``request_usage``).

The daemon writes rows in batches (``routerd.request_log``), so a write is one
transaction of many rows; retention is by rows and by age (``prune_requests``).
Both may be given a short ``busy_timeout``: the daemon calls them from its event
loop, which must not wait seconds for a lock another process holds — the rows are
kept in memory and written at the next try.

Mixed into ``state.store.Store``; the SQL for this table lives here only.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from sqlite_utils import Database

from state.connection import describe, write_transaction
from state.records import StoreError, check_byte_count, check_duration_ms

REQUEST_COLUMNS: Final = (
    "ts",
    "tenant",
    "model",
    "version",
    "endpoint",
    "status",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "waited_ms",
    "duration_ms",
    "stream_failed",
)
"""The columns a row is written with, in the order of ``RequestRow``."""

RequestTuple = tuple[
    float, str | None, str | None, str | None, str, int, str | None, int, int, float | None,
    float, bool,
]  # fmt: skip
"""A row as a plain tuple in ``REQUEST_COLUMNS`` order: what the daemon buffers (a
tuple costs a tenth of a ``RequestRow`` to make, and every request makes one)."""


class RequestRow(NamedTuple):
    """One request to record (``Store.record_requests``); any tuple of these fields in
    this order is accepted as well."""

    ts: float  # wall-clock seconds since the epoch when it arrived
    tenant: str | None
    model: str | None  # the model name served; None when it never reached a model
    version: str | None
    endpoint: str  # "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
    status: int  # the final HTTP status
    error: str | None  # the OpenAI error code (else type) of a failure
    prompt_tokens: int
    completion_tokens: int
    waited_ms: float | None  # waited for a load or wake-up; None: it got a ready model, or none
    duration_ms: float  # arrival to response end
    stream_failed: bool = False  # answered 200, then ended with an error event


@dataclass(frozen=True)
class RequestEntry:
    """One stored row of the request log (see ``RequestRow`` for the fields)."""

    id: int
    ts: float
    tenant: str | None
    model: str | None
    version: str | None
    endpoint: str
    status: int
    error: str | None
    prompt_tokens: int
    completion_tokens: int
    waited_ms: float | None
    duration_ms: float
    stream_failed: bool

    @property
    def model_id(self) -> str | None:
        """``name@version`` of what served it, None if nothing did."""
        return None if self.model is None else f"{self.model}@{self.version}"

    @property
    def failed(self) -> bool:
        """Our failure (5xx, or an error event in a stream), as error rates count it."""
        return self.status >= 500 or self.stream_failed


@dataclass(frozen=True)
class RequestUsage:
    """The requests one model version served (``model`` None: those that never reached
    one), as ``Store.request_usage`` adds them up.

    ``errors``: 5xx answers and streams that failed after 200; ``rejected``: 4xx
    answers (the client's doing, the requests that never reached a model included);
    ``cold_starts``: requests that waited for a load or a wake-up, and
    ``mean_waited_ms`` how long they waited on average (None when none did).
    """

    model: str | None
    version: str | None
    requests: int
    errors: int
    rejected: int
    prompt_tokens: int
    completion_tokens: int
    cold_starts: int
    mean_waited_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def check_request_row(row: object) -> RequestTuple:
    """``row`` as the values stored, or ``ValueError`` naming the field that cannot be."""
    if not isinstance(row, tuple) or len(row) != len(REQUEST_COLUMNS):
        raise ValueError(f"a request row is a tuple of {len(REQUEST_COLUMNS)} fields, got {row!r}")
    ts, tenant, model, version, endpoint, status, error, t_in, t_out, waited, took, failed = row
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"ts must be a finite number, got {ts!r}")
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError(f"endpoint must be a non-empty string, got {endpoint!r}")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 999:
        raise ValueError(f"status must be an HTTP status (100..999), got {status!r}")
    for name, text in (("tenant", tenant), ("model", model), ("version", version)):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name} must be a string or None, got {type(text).__name__}")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"error must be a string or None, got {type(error).__name__}")
    if not isinstance(failed, bool):
        raise ValueError(f"stream_failed must be a boolean, got {failed!r}")
    return (
        float(ts),
        tenant,
        model,
        version,
        endpoint,
        status,
        error,
        check_byte_count("prompt_tokens", t_in),
        check_byte_count("completion_tokens", t_out),
        None if waited is None else check_duration_ms("waited_ms", waited),
        check_duration_ms("duration_ms", took),
        failed,
    )


_INSERT: Final = (
    f"INSERT INTO request_log ({', '.join(REQUEST_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"
)
_SELECT: Final = f"SELECT id, {', '.join(REQUEST_COLUMNS)} FROM request_log"
ITER_BATCH: Final = 10_000
"""Rows ``iter_requests`` reads per query."""


class RequestsMixin:
    """Store methods for the request log (see the module docstring)."""

    if TYPE_CHECKING:
        _db: Database | None
        _path: Path
        _busy_timeout: float

        def _read(self, action: str) -> AbstractContextManager[Database]: ...

        def _write(self, action: str) -> AbstractContextManager[Database]: ...

    def record_requests(
        self, rows: Sequence[RequestTuple], *, busy_timeout: float | None = None
    ) -> None:
        """Append ``rows`` (``RequestRow`` or plain tuples in its order) in one transaction.

        Every row is checked first; a bad one raises ``ValueError`` naming its index and
        field, and nothing is written. ``busy_timeout``: seconds to wait for another
        process's lock (None: the store's own), then ``StoreError``.
        """
        checked = []
        for index, row in enumerate(rows):
            try:
                checked.append(check_request_row(row))
            except ValueError as exc:
                raise ValueError(f"request row {index}: {exc}") from None
        if not checked:
            return
        with self._write_waiting(f"recording {len(checked)} requests", busy_timeout) as db:
            db.conn.executemany(_INSERT, checked)

    def requests(
        self, *, since: float | None = None, until: float | None = None, limit: int | None = None
    ) -> list[RequestEntry]:
        """Rows that arrived at or after ``since`` and before ``until`` (wall-clock
        seconds; None: unbounded), oldest first (by arrival, then by id); at most ``limit``."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise ValueError(f"limit must be an integer or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where, args = _bounds(since, until)
        with self._read("reading the request log") as db:
            rows = db.execute(
                f"{_SELECT}{where} ORDER BY ts, id LIMIT ?", [*args, -1 if limit is None else limit]
            ).fetchall()
        return [_entry(row) for row in rows]

    def iter_requests(
        self, *, since: float | None = None, until: float | None = None, batch: int = ITER_BATCH
    ) -> Iterator[RequestEntry]:
        """The rows ``requests`` would return, read ``batch`` at a time, so that a large
        log is never held in memory at once. Each batch is its own query: rows written
        meanwhile appear if they sort after the last one read."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        where, args = _bounds(since, until)
        after: tuple[float, int] | None = None
        while True:
            page_where, page_args = where, list(args)
            if after is not None:
                page_where += (" AND " if page_where else " WHERE ") + "(ts, id) > (?, ?)"
                page_args += after
            with self._read("reading the request log") as db:
                rows = db.execute(
                    f"{_SELECT}{page_where} ORDER BY ts, id LIMIT ?", [*page_args, batch]
                ).fetchall()
            entries = [_entry(row) for row in rows]
            yield from entries
            if len(entries) < batch:
                return
            after = (entries[-1].ts, entries[-1].id)

    def prune_requests(
        self, *, max_rows: int, max_age: float, now: float, busy_timeout: float | None = None
    ) -> int:
        """Delete the rows that arrived before ``now - max_age``, then the oldest beyond
        ``max_rows``; return how many were deleted. ``max_rows`` 0 or ``max_age`` inf:
        no limit of that kind. ``busy_timeout`` as for ``record_requests``.

        Its cost is the rows it deletes (an index range each) plus, with ``max_rows``,
        counting the rows (the ts index: some 10 ms a million rows): meant for every
        minute or so, not every write."""
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 0:
            raise ValueError(f"max_rows must be 0 (no limit) or more, got {max_rows!r}")
        if isinstance(max_age, bool) or not isinstance(max_age, int | float) or not max_age > 0:
            raise ValueError(f"max_age must be positive seconds (inf: no limit), got {max_age!r}")
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number, got {now!r}")
        deleted = 0
        with self._write_waiting("pruning the request log", busy_timeout) as db:
            if math.isfinite(max_age):
                cursor = db.execute("DELETE FROM request_log WHERE ts < ?", [now - max_age])
                deleted += cursor.rowcount
            if max_rows:
                excess = db.execute("SELECT COUNT(*) FROM request_log").fetchone()[0] - max_rows
                if excess > 0:  # the newest row to delete, walking the ts index from the oldest
                    ts, row_id = db.execute(
                        "SELECT ts, id FROM request_log ORDER BY ts, id LIMIT 1 OFFSET ?",
                        [excess - 1],
                    ).fetchone()
                    cursor = db.execute(
                        "DELETE FROM request_log WHERE (ts, id) <= (?, ?)", [ts, row_id]
                    )
                    deleted += cursor.rowcount
        return deleted

    def request_usage(self, *, since: float | None = None) -> list[RequestUsage]:
        """Requests since ``since`` (wall-clock seconds; None: every row kept) added up per
        model version, by model and version; those that reached no model come last.

        It reads every row in the window: on a large log, call it from a thread of
        its own, on a store opened there (``routerd.request_log`` does)."""
        where, args = _bounds(since, None)
        with self._read("adding up the request log") as db:
            rows = db.execute(
                "SELECT model, version, COUNT(*), "
                "SUM(status >= 500 OR stream_failed), SUM(status BETWEEN 400 AND 499), "
                "SUM(prompt_tokens), SUM(completion_tokens), COUNT(waited_ms), AVG(waited_ms) "
                f"FROM request_log{where} GROUP BY model, version "
                "ORDER BY model IS NULL, model, version",
                args,
            ).fetchall()
        return [
            RequestUsage(
                model=r[0],
                version=r[1],
                requests=int(r[2]),
                errors=int(r[3]),
                rejected=int(r[4]),
                prompt_tokens=int(r[5]),
                completion_tokens=int(r[6]),
                cold_starts=int(r[7]),
                mean_waited_ms=None if r[8] is None else float(r[8]),
            )
            for r in rows
        ]

    @contextmanager
    def _write_waiting(self, action: str, busy_timeout: float | None) -> Iterator[Database]:
        """``_write``, waiting at most ``busy_timeout`` seconds for another process's lock."""
        if busy_timeout is None:
            with self._write(action) as db:
                yield db
            return
        if not busy_timeout >= 0:
            raise ValueError(f"busy_timeout must be 0 or more seconds, got {busy_timeout!r}")
        opened = self._db
        if opened is None:
            raise StoreError(f"{action} failed: the store at {self._path} is closed")
        try:
            opened.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            try:
                with write_transaction(opened):
                    yield opened
            finally:
                opened.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        except sqlite3.ProgrammingError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(describe(exc, self._path, action, busy_timeout=busy_timeout)) from exc


def _bounds(since: float | None, until: float | None) -> tuple[str, list[float]]:
    """The WHERE clause (with its leading space, or empty) for an arrival window."""
    clauses, args = [], []
    for name, value, clause in (("since", since, "ts >= ?"), ("until", until, "ts < ?")):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{name} must be a number of seconds or None, got {value!r}")
        clauses.append(clause)
        args.append(float(value))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def _entry(row: Sequence[Any]) -> RequestEntry:
    return RequestEntry(
        id=int(row[0]),
        ts=float(row[1]),
        tenant=row[2],
        model=row[3],
        version=row[4],
        endpoint=row[5],
        status=int(row[6]),
        error=row[7],
        prompt_tokens=int(row[8]),
        completion_tokens=int(row[9]),
        waited_ms=None if row[10] is None else float(row[10]),
        duration_ms=float(row[11]),
        stream_failed=bool(row[12]),
    )
