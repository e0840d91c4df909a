"""The registry store: model versions and the event log, kept in one SQLite file.

The registry in SQLite is the truth at run time (config is synced into it), so it
must survive restarts and crashes, and two sources of versions (config, the admin API)
must not overwrite each other's rows by accident. ``Store`` is the only code that
talks to the database; everything it takes is checked first (``ValueError`` naming the
field), and every database failure comes out as ``StoreError`` with a message that
says which file and what to do, never a bare ``sqlite3`` exception.

Threading: a ``Store`` belongs to one thread, the event loop's. Its connection is
opened with sqlite3's same-thread check, so use from another thread fails loudly
instead of racing. Calls are short (a few rows, one transaction) and are made
directly from the loop.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from state.connection import BUSY_TIMEOUT_S, connect, describe, write_transaction
from state.migrations import migrate
from state.records import (
    Event,
    StoreError,
    SyncResult,
    VersionRecord,
    VersionSpec,
    check_identifier,
    check_name,
    check_source,
    check_text,
    check_version,
    dump_json_object,
    load_json_object,
)

_VERSION_ORDER = "name, created_at, rowid"  # rowid: insertion order, for equal timestamps
_EVENT_KIND_MAX_LEN = 64


class Store:
    """Models, versions and events over SQLite. Create with ``Store.open``."""

    def __init__(
        self, db: Database, path: Path, clock: Callable[[], float], busy_timeout: float, schema: int
    ) -> None:
        self._db: Database | None = db
        self._path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._schema = schema

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = BUSY_TIMEOUT_S,
    ) -> Store:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        Creates the parent directory. Raises ``StoreError`` if the directory cannot be
        made, the file is not a usable database, it stays locked past ``busy_timeout``
        seconds, or its schema is newer than this code.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"opening the store failed: cannot create directory {path.parent} "
                f"({exc.strerror or exc})"
            ) from exc
        db: Database | None = None
        try:
            db = connect(path, busy_timeout=busy_timeout)
            schema = migrate(db, path=path, clock=clock)
        except sqlite3.Error as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.ProgrammingError):
                raise
            raise StoreError(
                describe(exc, path, "opening the store", busy_timeout=busy_timeout)
            ) from exc
        except BaseException:
            if db is not None:
                db.close()
            raise
        return cls(db, path, clock, busy_timeout, schema)

    def close(self) -> None:
        """Close the database. Idempotent; any later call raises ``StoreError``."""
        db, self._db = self._db, None
        if db is None:
            return
        try:
            db.close()
        except sqlite3.Error as exc:
            raise StoreError(
                describe(exc, self._path, "closing the store", busy_timeout=self._busy_timeout)
            ) from exc

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def schema_version(self) -> int:
        """The migration number the database is at (the newest this code knows)."""
        return self._schema

    def integrity_ok(self) -> bool:
        """``PRAGMA integrity_check`` says "ok". A damaged file answers False, not an error."""
        try:
            with self._read("checking integrity") as db:
                rows = db.execute("PRAGMA integrity_check").fetchall()
        except StoreError as exc:
            cause = exc.__cause__
            code = getattr(cause, "sqlite_errorname", "") or ""
            if code == "SQLITE_NOTADB" or code.startswith("SQLITE_CORRUPT"):
                return False
            raise
        return [tuple(row) for row in rows] == [("ok",)]

    # -- versions --------------------------------------------------------------------

    def upsert_version(self, spec: VersionSpec, *, source: str) -> VersionRecord:
        """Insert ``spec``, or update that version's backend/path/options/source.

        An update keeps ``created_at`` and sets ``updated_at`` to now, even when nothing
        else changed (re-registering counts as touching it).
        """
        row = _spec_row(spec, check_source(source))
        with self._write(f"registering {spec.model_id}") as db:
            now = self._now()
            existing = _fetch_version(db, spec.name, spec.version)
            if existing is None:
                _ensure_model(db, spec.name, now)
                row.update(created_at=now, updated_at=now)
                db.table("versions").insert(row)
            else:
                db.table("versions").update((spec.name, spec.version), _changes(row, now))
                row.update(created_at=existing["created_at"], updated_at=now)
        return _record(row)

    def get_version(self, name: str, version: str) -> VersionRecord | None:
        check_name(name)
        check_version(version)
        with self._read(f"reading {name}@{version}") as db:
            row = _fetch_version(db, name, version)
        return None if row is None else _record(row)

    def list_versions(self, name: str | None = None) -> list[VersionRecord]:
        """All versions (or those of ``name``), by name, then age, then insertion order."""
        where, args = (None, []) if name is None else ("name = ?", [check_name(name)])
        with self._read("listing versions") as db:
            rows = list(db.table("versions").rows_where(where, args, order_by=_VERSION_ORDER))
        return [_record(row) for row in rows]

    def delete_version(self, name: str, version: str) -> bool:
        """Delete one version (and its model row if it was the last); False if absent."""
        check_name(name)
        check_version(version)
        with self._write(f"deleting {name}@{version}") as db:
            if _fetch_version(db, name, version) is None:
                return False
            _delete_version(db, name, version)
        return True

    def sync_versions(self, specs: Sequence[VersionSpec], *, source: str) -> SyncResult:
        """Make the versions from ``source`` exactly ``specs``, in one transaction.

        New ones are inserted, ones whose backend/path/options differ are updated, and
        rows of ``source`` missing from ``specs`` are deleted. Rows of other sources are
        left alone, except that a spec naming one takes it over: its source becomes
        ``source`` (reported as updated), so from then on this source owns it.
        """
        check_source(source)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for spec in specs:
            row = _spec_row(spec, source)
            key = (spec.name, spec.version)
            if key in rows:
                raise ValueError(f"{spec.model_id} appears twice in the {source} versions")
            rows[key] = row
        added: list[str] = []
        updated: list[str] = []
        removed: list[str] = []
        with self._write(f"syncing {source} versions") as db:
            now = self._now()
            existing = {
                (row["name"], row["version"]): row
                for row in db.table("versions").rows_where(order_by=_VERSION_ORDER)
            }
            for key, row in rows.items():
                old = existing.get(key)
                model_id = f"{key[0]}@{key[1]}"
                if old is None:
                    _ensure_model(db, key[0], now)
                    db.table("versions").insert({**row, "created_at": now, "updated_at": now})
                    added.append(model_id)
                elif any(old[column] != row[column] for column in _SPEC_COLUMNS):
                    db.table("versions").update(key, _changes(row, now))
                    updated.append(model_id)
            for key, old in existing.items():
                if old["source"] == source and key not in rows:
                    _delete_version(db, *key)
                    removed.append(f"{key[0]}@{key[1]}")
        return SyncResult(added=added, updated=updated, removed=removed)

    # -- events ----------------------------------------------------------------------

    def record_event(
        self,
        kind: str,
        model: str,
        version: str,
        *,
        device: str | None = None,
        reason: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        """Append to the event log (a load, an eviction, a failure) and return the entry."""
        check_identifier("kind", kind, _EVENT_KIND_MAX_LEN)
        check_name(model)
        check_version(version)
        if device is not None:
            check_text("device", device)
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"reason must be a string, got {type(reason).__name__}")
        detail_json = dump_json_object("detail", {} if detail is None else detail)
        row: dict[str, Any] = {
            "kind": kind,
            "model": model,
            "version": version,
            "device": device,
            "reason": reason,
            "detail": detail_json,
        }
        with self._write(f"recording a {kind} event for {model}@{version}") as db:
            row["ts"] = self._now()
            table = db.table("events")
            table.insert(row)
            event_id = table.last_rowid
        assert event_id is not None
        return _event({**row, "id": event_id})

    def events(self, *, limit: int = 100, model: str | None = None) -> list[Event]:
        """The latest ``limit`` events (of ``model`` if given), newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        where, args = (None, []) if model is None else ("model = ?", [check_name(model)])
        with self._read("reading events") as db:
            rows = list(
                db.table("events").rows_where(where, args, order_by="ts DESC, id DESC", limit=limit)
            )
        return [_event(row) for row in rows]

    # -- plumbing --------------------------------------------------------------------

    def _now(self) -> float:
        return float(self._clock())

    @contextmanager
    def _read(self, action: str) -> Iterator[Database]:
        """The open database; SQLite failures inside the block become ``StoreError``."""
        db = self._db
        if db is None:
            raise StoreError(f"{action} failed: the store at {self._path} is closed")
        try:
            yield db
        except sqlite3.ProgrammingError:
            raise  # misuse (wrong thread, closed cursor): a bug, not a database problem
        except sqlite3.Error as exc:
            raise StoreError(
                describe(exc, self._path, action, busy_timeout=self._busy_timeout)
            ) from exc

    @contextmanager
    def _write(self, action: str) -> Iterator[Database]:
        """Like ``_read``, inside one write transaction (rolled back on any error)."""
        with self._read(action) as db, write_transaction(db):
            yield db


# -- rows ----------------------------------------------------------------------------

_SPEC_COLUMNS = ("backend", "path", "options", "source")


def _spec_row(spec: VersionSpec, source: str) -> dict[str, Any]:
    """The checked columns a spec provides (no timestamps yet)."""
    if not isinstance(spec, VersionSpec):
        raise ValueError(f"expected a VersionSpec, got {type(spec).__name__}")
    return {
        "name": check_name(spec.name),
        "version": check_version(spec.version),
        "backend": check_text("backend", spec.backend),
        "path": check_text("path", spec.path),
        "options": dump_json_object("options", spec.options),
        "source": source,
    }


def _changes(row: Mapping[str, Any], now: float) -> dict[str, Any]:
    return {**{column: row[column] for column in _SPEC_COLUMNS}, "updated_at": now}


def _fetch_version(db: Database, name: str, version: str) -> dict[str, Any] | None:
    rows = list(
        db.table("versions").rows_where("name = ? AND version = ?", [name, version], limit=1)
    )
    return rows[0] if rows else None


def _ensure_model(db: Database, name: str, now: float) -> None:
    db.table("models").insert({"name": name, "created_at": now}, ignore=True)


def _delete_version(db: Database, name: str, version: str) -> None:
    db.table("versions").delete((name, version))
    if not db.table("versions").count_where("name = ?", [name]):
        db.table("models").delete(name)


def _record(row: Mapping[str, Any]) -> VersionRecord:
    return VersionRecord(
        name=row["name"],
        version=row["version"],
        backend=row["backend"],
        path=row["path"],
        options=load_json_object(row["options"]),
        source=row["source"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


def _event(row: Mapping[str, Any]) -> Event:
    return Event(
        id=int(row["id"]),
        ts=float(row["ts"]),
        kind=row["kind"],
        model=row["model"],
        version=row["version"],
        device=row["device"],
        reason=row["reason"],
        detail=load_json_object(row["detail"]),
    )
