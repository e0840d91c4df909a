"""The registry store: model versions, pins, measured footprints and the event log.

The registry in SQLite is the truth at run time (config is synced into it), so it
must survive restarts and crashes, and two sources of versions (config, the admin API)
must not overwrite each other's rows by accident. Pins and footprints hang off one
version and go with it when it is deleted; a footprint also goes when the version is
re-registered with another backend, path or options, since it no longer describes
what would be loaded. ``Store`` is the only code that talks to the database;
everything it takes is checked first (``ValueError`` naming the field), and every
database failure comes out as ``StoreError`` with a message that says which file and
what to do, never a bare ``sqlite3`` exception.

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
    FOOTPRINT_PARTS,
    Event,
    FootprintRecord,
    StoreError,
    SyncResult,
    VersionRecord,
    VersionSpec,
    check_byte_count,
    check_duration_ms,
    check_identifier,
    check_name,
    check_source,
    check_text,
    check_version,
    dump_json_object,
    load_json_object,
)
from state.requests import RequestsMixin
from state.routes import RoutesMixin, initial_state

_VERSION_ORDER = "name, created_at, rowid"  # rowid: insertion order, for equal timestamps
_EVENT_KIND_MAX_LEN = 64
_DEVICE_KIND_MAX_LEN = 32


class Store(RoutesMixin, RequestsMixin):
    """Models, versions, pins, footprints and events over SQLite. Create with ``Store.open``.

    Routes, shadows and rollouts come from ``RoutesMixin`` (``state.routes``); the
    per-request log from ``RequestsMixin`` (``state.requests``)."""

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
        scratch: bool = False,
    ) -> Store:
        """Open (or create) the database at ``path`` and bring its schema up to date.

        Creates the parent directory. Raises ``StoreError`` if the directory cannot be
        made, the file is not a usable database, it stays locked past ``busy_timeout``
        seconds, or its schema is newer than this code.

        ``scratch``: a database nobody needs after a crash (a simulation's): commits do
        not wait for the disk.
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
            if scratch:
                db.execute("PRAGMA synchronous = OFF")
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
        else changed (re-registering counts as touching it). An update that changes the
        backend, path or options drops the version's measured footprints; its pin stays.
        """
        row = _spec_row(spec, check_source(source))
        with self._write(f"registering {spec.model_id}") as db:
            now = self._now()
            existing = _fetch_version(db, spec.name, spec.version)
            if existing is None:
                _ensure_model(db, spec.name, now)
                row.update(created_at=now, updated_at=now, state=initial_state(db, spec.name))
                db.table("versions").insert(row)
            else:
                if _describes_other_files(existing, row):
                    _forget_footprints(db, spec.name, spec.version)
                db.table("versions").update((spec.name, spec.version), _changes(row, now))
                row.update(
                    created_at=existing["created_at"], updated_at=now, state=existing["state"]
                )
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
        """Delete one version (and its model row if it was the last); False if absent.

        Its pin and footprints go with it (foreign keys, ON DELETE CASCADE); its events stay.
        """
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
        ``source`` (reported as updated), so from then on this source owns it. An
        update that changes the backend, path or options drops the measured footprints.
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
                    state = initial_state(db, key[0])
                    db.table("versions").insert(
                        {**row, "created_at": now, "updated_at": now, "state": state}
                    )
                    added.append(model_id)
                elif any(old[column] != row[column] for column in _SPEC_COLUMNS):
                    if _describes_other_files(old, row):
                        _forget_footprints(db, *key)
                    db.table("versions").update(key, _changes(row, now))
                    updated.append(model_id)
            for key, old in existing.items():
                if old["source"] == source and key not in rows:
                    _delete_version(db, *key)
                    removed.append(f"{key[0]}@{key[1]}")
        return SyncResult(added=added, updated=updated, removed=removed)

    # -- pins ------------------------------------------------------------------------

    def set_pinned(self, name: str, version: str, pinned: bool) -> None:
        """Pin or unpin a registered version; idempotent (a pin keeps its first time).

        ``ValueError`` if the version is not registered.
        """
        check_name(name)
        check_version(version)
        if not isinstance(pinned, bool):
            raise ValueError(f"pinned must be a boolean, got {type(pinned).__name__}")
        action = "pinning" if pinned else "unpinning"
        with self._write(f"{action} {name}@{version}") as db:
            if _fetch_version(db, name, version) is None:
                raise ValueError(f"{name}@{version} is not registered")
            if pinned:
                db.execute(
                    "INSERT OR IGNORE INTO pins (name, version, pinned_at) VALUES (?, ?, ?)",
                    [name, version, self._now()],
                )
            else:
                db.execute("DELETE FROM pins WHERE name = ? AND version = ?", [name, version])

    def pinned_versions(self) -> list[tuple[str, str]]:
        """Every pinned ``(name, version)``, by name, then version."""
        with self._read("listing pins") as db:
            rows = db.execute("SELECT name, version FROM pins ORDER BY name, version").fetchall()
        return [(str(name), str(version)) for name, version in rows]

    def is_pinned(self, name: str, version: str) -> bool:
        check_name(name)
        check_version(version)
        with self._read(f"reading the pin of {name}@{version}") as db:
            return bool(db.table("pins").count_where("name = ? AND version = ?", [name, version]))

    # -- footprints ------------------------------------------------------------------

    def record_footprint(
        self,
        name: str,
        version: str,
        device_kind: str,
        *,
        measured: Mapping[str, int],
        estimated_bytes: int | None,
    ) -> None:
        """Store what ``name@version`` was measured to occupy on ``device_kind``.

        ``measured`` has exactly the keys ``weights``, ``runtime`` and ``working`` (bytes);
        ``measured_bytes`` is their sum. Replaces an earlier measurement for the same
        device kind. ``ValueError`` if the version is not registered or a value is bad.
        """
        check_name(name)
        check_version(version)
        check_identifier("device_kind", device_kind, _DEVICE_KIND_MAX_LEN)
        if not isinstance(measured, Mapping):
            raise ValueError(f"measured must be a mapping, got {type(measured).__name__}")
        keys = set(measured)
        if keys != set(FOOTPRINT_PARTS):
            missing = [k for k in FOOTPRINT_PARTS if k not in keys]
            extra = sorted(str(k) for k in keys - set(FOOTPRINT_PARTS))
            raise ValueError(
                f"measured must have exactly the keys {', '.join(FOOTPRINT_PARTS)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(extra)}" if extra else "")
            )
        parts = {k: check_byte_count(f"measured.{k}", measured[k]) for k in FOOTPRINT_PARTS}
        if estimated_bytes is not None:
            check_byte_count("estimated_bytes", estimated_bytes)
        model_id = f"{name}@{version}"
        with self._write(f"recording the footprint of {model_id} on {device_kind}") as db:
            if _fetch_version(db, name, version) is None:
                raise ValueError(f"{model_id} is not registered")
            row: dict[str, Any] = {
                "name": name,
                "version": version,
                "device_kind": device_kind,
                "estimated_bytes": estimated_bytes,
                "measured_bytes": sum(parts.values()),
                "weights_bytes": parts["weights"],
                "runtime_bytes": parts["runtime"],
                "working_bytes": parts["working"],
                "measured_at": self._now(),
            }
            db.execute(_REPLACE_FOOTPRINT, [row[c] for c in _FOOTPRINT_COLUMNS])

    def measured_footprint(
        self, name: str, version: str, device_kind: str
    ) -> FootprintRecord | None:
        """The stored measurement of ``name@version`` on ``device_kind``, if any."""
        check_name(name)
        check_version(version)
        check_identifier("device_kind", device_kind, _DEVICE_KIND_MAX_LEN)
        with self._read(f"reading the footprint of {name}@{version}") as db:
            cursor = db.execute(_SELECT_FOOTPRINT, [name, version, device_kind])
            found = cursor.fetchone()
            columns = [d[0] for d in cursor.description]
        return _footprint(dict(zip(columns, found, strict=True))) if found else None

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
        bytes: int | None = None,
        duration_ms: float | None = None,
        trigger: str | None = None,
    ) -> Event:
        """Append to the event log (a load, an eviction, a failure) and return the entry.

        ``bytes``: what the load took or the eviction freed (a leak: what the device
        did not show as free again); ``duration_ms``: how long it took; ``trigger``: for
        an eviction, the model id of the load that needed the room. The kinds routerd
        records are described at ``state.records.EVENT_KINDS``.
        """
        check_identifier("kind", kind, _EVENT_KIND_MAX_LEN)
        check_name(model)
        check_version(version)
        if device is not None:
            check_text("device", device)
        if reason is not None and not isinstance(reason, str):
            raise ValueError(f"reason must be a string, got {type(reason).__name__}")
        if bytes is not None:
            check_byte_count("bytes", bytes)
        if duration_ms is not None:
            duration_ms = check_duration_ms("duration_ms", duration_ms)
        if trigger is not None:
            check_text("trigger", trigger)
        detail_json = dump_json_object("detail", {} if detail is None else detail)
        row: dict[str, Any] = {
            "kind": kind,
            "model": model,
            "version": version,
            "device": device,
            "reason": reason,
            "detail": detail_json,
            "bytes": bytes,
            "duration_ms": duration_ms,
            "trigger": trigger,
        }
        with self._write(f"recording a {kind} event for {model}@{version}") as db:
            row["ts"] = self._now()
            # Plain SQL rather than sqlite-utils' insert, which reads the table's shape
            # on every call: a simulation records tens of thousands of these.
            event_id = db.execute(_INSERT_EVENT, [row[c] for c in _EVENT_COLUMNS]).lastrowid
        assert event_id is not None
        return _event({**row, "id": event_id})

    def events(
        self, *, limit: int = 100, model: str | None = None, version: str | None = None
    ) -> list[Event]:
        """The latest ``limit`` events (of ``model``, and ``version`` of it, if given),
        newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        if version is not None and model is None:
            raise ValueError("version needs model: events are filtered by name@version")
        where: str | None = None
        args: list[str] = []
        if model is not None:
            where, args = "model = ?", [check_name(model)]
            if version is not None:
                where, args = "model = ? AND version = ?", [model, check_version(version)]
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

_EVENT_COLUMNS = (
    "ts", "kind", "model", "version", "device", "reason", "detail", "bytes", "duration_ms",
    "trigger",
)  # fmt: skip
# Footprints are read and written at every load (plain SQL, as events are).
_FOOTPRINT_COLUMNS = (
    "name", "version", "device_kind", "estimated_bytes", "measured_bytes", "weights_bytes",
    "runtime_bytes", "working_bytes", "measured_at",
)  # fmt: skip
_REPLACE_FOOTPRINT = (
    f"INSERT OR REPLACE INTO footprints ({', '.join(_FOOTPRINT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_FOOTPRINT_COLUMNS))})"
)
_SELECT_FOOTPRINT = (
    "SELECT * FROM footprints WHERE name = ? AND version = ? AND device_kind = ? LIMIT 1"
)
_INSERT_EVENT = (
    "INSERT INTO events ("
    + ", ".join(f'"{c}"' for c in _EVENT_COLUMNS)
    + f") VALUES ({', '.join('?' * len(_EVENT_COLUMNS))})"
)

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


_FILE_COLUMNS = ("backend", "path", "options")  # what a measured footprint depends on


def _describes_other_files(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when an update changes what would be loaded, so measurements are stale."""
    return any(old[column] != new[column] for column in _FILE_COLUMNS)


def _forget_footprints(db: Database, name: str, version: str) -> None:
    db.execute("DELETE FROM footprints WHERE name = ? AND version = ?", [name, version])


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
        state=row.get("state") or "active",
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
        bytes=None if row["bytes"] is None else int(row["bytes"]),
        duration_ms=None if row["duration_ms"] is None else float(row["duration_ms"]),
        trigger=row["trigger"],
    )


def _footprint(row: Mapping[str, Any]) -> FootprintRecord:
    estimated = row["estimated_bytes"]
    return FootprintRecord(
        name=row["name"],
        version=row["version"],
        device_kind=row["device_kind"],
        estimated_bytes=None if estimated is None else int(estimated),
        measured_bytes=int(row["measured_bytes"]),
        weights_bytes=int(row["weights_bytes"]),
        runtime_bytes=int(row["runtime_bytes"]),
        working_bytes=int(row["working_bytes"]),
        measured_at=float(row["measured_at"]),
    )
