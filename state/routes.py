"""Routes, shadows, route history and rollouts: the traffic half of the store (schema 3).

A model name is served through its route: versions with integer weights, and at most
one shadow version that receives a copy of a share of the requests. A model without
route rows is served by its newest version (the implicit route). Every change of a
route or shadow appends a row to ``route_history`` in the same transaction, so the
history cannot miss a change nor record one that did not happen.

Setting a route also moves the versions' lifecycle state: a version given weight is
``active``; one that had weight and lost it is ``retired``. A version registered while
its model has a route starts ``staged`` (no traffic until a route or rollout gives
it some).

Rollouts are rows the rollout controller (``routerd.rollout``) drives: their plan,
status, current step and when it started, and an append-only log of every step.
The step clock is the controller's, passed in; ``created_at``/``updated_at`` are the
store's.

Mixed into ``state.store.Store``; the SQL for these tables lives here only.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlite_utils import Database

from state.records import (
    check_identifier,
    check_name,
    check_version,
    dump_json_object,
    load_json_object,
)

ROLLOUT_STATUSES: Final = ("running", "paused", "promoted", "rolled_back", "aborted", "failed")
"""``running`` and ``paused`` are live (at most one per model name); the rest are final."""

LIVE_ROLLOUT_STATUSES: Final = ("running", "paused")
_ACTION_MAX_LEN = 32
MAX_WEIGHT: Final = 1_000_000


@dataclass(frozen=True)
class Shadow:
    """A version mirrored ``percent`` of a model's requests; its answers are discarded."""

    version: str
    percent: float


@dataclass(frozen=True)
class RouteRecord:
    """A model's route: ``weights`` by version (empty: the implicit newest-version route)."""

    name: str
    weights: dict[str, int]
    shadow: Shadow | None

    @property
    def explicit(self) -> bool:
        return bool(self.weights)


@dataclass(frozen=True)
class RouteChange:
    """One entry of ``route_history``: the route as it became, and why."""

    id: int
    ts: float
    name: str
    weights: dict[str, int]
    shadow: dict[str, Any] | None
    reason: str


@dataclass(frozen=True)
class RolloutRecord:
    id: int
    name: str
    from_version: str
    to_version: str
    plan: dict[str, Any]
    status: str
    step: int  # index into plan["steps"]
    step_started_at: float  # controller clock
    reason: str | None
    created_at: float
    updated_at: float

    @property
    def live(self) -> bool:
        return self.status in LIVE_ROLLOUT_STATUSES


@dataclass(frozen=True)
class RolloutStep:
    """One entry of a rollout's log: what was done (``action``) at which step and weight."""

    id: int
    rollout_id: int
    ts: float
    action: str
    step: int
    weight: int
    detail: dict[str, Any]


def initial_state(db: Database, name: str) -> str:
    """The state of a version about to be inserted: staged if its model has a route."""
    routed = db.execute("SELECT COUNT(*) FROM routes WHERE name = ?", [name]).fetchone()[0]
    return "staged" if routed else "active"


def check_weights(weights: object) -> dict[str, int]:
    """``{version: weight}`` with integer weights ≥ 0 summing to more than 0, else ValueError."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError("weights must map at least one version to an integer weight")
    checked: dict[str, int] = {}
    for version, weight in weights.items():
        check_version(version)
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValueError(f"weight of version {version} must be an integer, got {weight!r}")
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of version {version} must be 0..{MAX_WEIGHT}, got {weight}")
        checked[version] = weight
    if sum(checked.values()) <= 0:
        raise ValueError("at least one weight must be above 0")
    return checked


def check_percent(percent: object) -> float:
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise ValueError(f"percent must be a number, got {type(percent).__name__}")
    # The range first: math.isfinite raises OverflowError on an int past a double's.
    if not 0 < percent <= 100 or not math.isfinite(percent):
        raise ValueError(f"percent must be above 0 and at most 100, got {percent}")
    return float(percent)


class RoutesMixin:
    """Store methods for routes, shadows and rollouts (see the module docstring)."""

    if TYPE_CHECKING:

        def _read(self, action: str) -> AbstractContextManager[Database]: ...

        def _write(self, action: str) -> AbstractContextManager[Database]: ...

        def _now(self) -> float: ...

    # -- routes ----------------------------------------------------------------------

    def routes(self) -> list[RouteRecord]:
        """Every model with route rows or a shadow, by name."""
        with self._read("listing routes") as db:
            names = [
                row[0]
                for row in db.execute(
                    "SELECT name FROM routes UNION SELECT name FROM shadows ORDER BY name"
                ).fetchall()
            ]
            return [_route(db, name) for name in names]

    def route(self, name: str) -> RouteRecord:
        """``name``'s route; empty weights and no shadow when it has none."""
        check_name(name)
        with self._read(f"reading the route of {name}") as db:
            return _route(db, name)

    def set_route(self, name: str, weights: Mapping[str, int], *, reason: str) -> RouteRecord:
        """Replace ``name``'s weights in one transaction; every version must be registered.

        Versions given weight become ``active``; versions that had weight and lost it
        become ``retired``. ``ValueError`` names what is wrong.
        """
        check_name(name)
        checked = check_weights(weights)
        _check_reason(reason)
        with self._write(f"setting the route of {name}") as db:
            for version in checked:
                _require_version(db, name, version)
            before = _route(db, name)
            db.execute("DELETE FROM routes WHERE name = ?", [name])
            for version, weight in checked.items():
                db.execute(
                    "INSERT INTO routes (name, version, weight) VALUES (?, ?, ?)",
                    [name, version, weight],
                )
            for version, weight in checked.items():
                if weight > 0:
                    _set_state(db, name, version, "active")
            for version, weight in before.weights.items():
                if weight > 0 and checked.get(version, 0) == 0:
                    _set_state(db, name, version, "retired")
            after = _route(db, name)
            self._append_history(db, after, reason)
        return after

    def clear_route(self, name: str, *, reason: str) -> bool:
        """Remove ``name``'s weights (back to the newest version); False if it had none."""
        return self._clear(name, "route", reason, has=lambda route: bool(route.weights))

    def set_shadow(self, name: str, version: str, percent: float, *, reason: str) -> RouteRecord:
        """Mirror ``percent`` of ``name``'s requests to ``version`` (replacing any shadow)."""
        check_name(name)
        check_version(version)
        share = check_percent(percent)
        _check_reason(reason)
        with self._write(f"setting the shadow of {name}") as db:
            _require_version(db, name, version)
            db.execute(
                "INSERT OR REPLACE INTO shadows (name, version, percent) VALUES (?, ?, ?)",
                [name, version, share],
            )
            after = _route(db, name)
            self._append_history(db, after, reason)
        return after

    def clear_shadow(self, name: str, *, reason: str) -> bool:
        """Stop mirroring ``name``'s requests; False if it had no shadow."""
        return self._clear(name, "shadow", reason, has=lambda route: route.shadow is not None)

    def _clear(
        self,
        name: str,
        part: Literal["route", "shadow"],
        reason: str,
        *,
        has: Callable[[RouteRecord], bool],
    ) -> bool:
        """Delete ``name``'s rows of table ``{part}s`` and log the route as it became, in one
        transaction; False, logging nothing, when ``has`` finds no such part."""
        check_name(name)
        _check_reason(reason)
        with self._write(f"clearing the {part} of {name}") as db:
            if not has(_route(db, name)):
                return False
            db.execute(f"DELETE FROM {part}s WHERE name = ?", [name])
            self._append_history(db, _route(db, name), reason)
        return True

    def route_history(self, name: str, *, limit: int = 50) -> list[RouteChange]:
        """``name``'s latest route changes, newest first."""
        check_name(name)
        _check_limit(limit)
        with self._read(f"reading the route history of {name}") as db:
            rows = db.execute(
                "SELECT id, ts, name, weights, shadow, reason FROM route_history "
                "WHERE name = ? ORDER BY ts DESC, id DESC LIMIT ?",
                [name, limit],
            ).fetchall()
        return [
            RouteChange(
                id=int(r[0]),
                ts=float(r[1]),
                name=r[2],
                weights={k: int(v) for k, v in load_json_object(r[3]).items()},
                shadow=None if r[4] is None else load_json_object(r[4]),
                reason=r[5],
            )
            for r in rows
        ]

    def _append_history(self, db: Database, route: RouteRecord, reason: str) -> None:
        shadow = (
            None
            if route.shadow is None
            else json.dumps({"version": route.shadow.version, "percent": route.shadow.percent})
        )
        db.execute(
            "INSERT INTO route_history (ts, name, weights, shadow, reason) VALUES (?, ?, ?, ?, ?)",
            [self._now(), route.name, dump_json_object("weights", route.weights), shadow, reason],
        )

    # -- rollouts --------------------------------------------------------------------

    def create_rollout(
        self,
        name: str,
        from_version: str,
        to_version: str,
        plan: Mapping[str, Any],
        *,
        step_started_at: float,
    ) -> RolloutRecord:
        """A new ``running`` rollout at step 0. ``ValueError`` if one is live for ``name``."""
        check_name(name)
        check_version(from_version)
        check_version(to_version)
        plan_json = dump_json_object("plan", plan)
        with self._write(f"starting a rollout of {name}") as db:
            _require_version(db, name, from_version)
            _require_version(db, name, to_version)
            now = self._now()
            try:
                cursor = db.execute(
                    "INSERT INTO rollouts (name, from_version, to_version, plan, status, step, "
                    "step_started_at, reason, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, 'running', 0, ?, NULL, ?, ?)",
                    [name, from_version, to_version, plan_json, step_started_at, now, now],
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"a rollout of {name} is already in progress") from None
            rollout_id = int(cursor.lastrowid or 0)
            return _rollout(_fetch_rollout(db, rollout_id))

    def update_rollout(
        self,
        rollout_id: int,
        *,
        status: str | None = None,
        step: int | None = None,
        step_started_at: float | None = None,
        reason: str | None = None,
    ) -> RolloutRecord:
        changes: dict[str, Any] = {}
        if status is not None:
            if status not in ROLLOUT_STATUSES:
                raise ValueError(f"status must be one of {', '.join(ROLLOUT_STATUSES)}")
            changes["status"] = status
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"step must be a non-negative integer, got {step!r}")
            changes["step"] = step
        if step_started_at is not None:
            changes["step_started_at"] = float(step_started_at)
        if reason is not None:
            changes["reason"] = reason
        with self._write(f"updating rollout {rollout_id}") as db:
            if _fetch_rollout(db, rollout_id) is None:
                raise ValueError(f"rollout {rollout_id} does not exist")
            changes["updated_at"] = self._now()
            columns = ", ".join(f"{column} = ?" for column in changes)
            db.execute(
                f"UPDATE rollouts SET {columns} WHERE id = ?", [*changes.values(), rollout_id]
            )
            return _rollout(_fetch_rollout(db, rollout_id))

    def rollouts(
        self, *, name: str | None = None, live: bool = False, limit: int = 50
    ) -> list[RolloutRecord]:
        """Rollouts (of ``name``; only live ones if ``live``), newest first."""
        _check_limit(limit)
        where, args = [], []
        if name is not None:
            where.append("name = ?")
            args.append(check_name(name))
        if live:
            where.append("status IN ('running', 'paused')")
        sql = "SELECT * FROM rollouts" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read("listing rollouts") as db:
            cursor = db.execute(sql + " ORDER BY id DESC LIMIT ?", [*args, limit])
            columns = [c[0] for c in cursor.description]
            rows = [dict(zip(columns, r, strict=True)) for r in cursor.fetchall()]
        return [_rollout(row) for row in rows]

    def record_rollout_step(
        self,
        rollout_id: int,
        action: str,
        *,
        step: int,
        weight: int,
        detail: Mapping[str, Any] | None = None,
    ) -> RolloutStep:
        check_identifier("action", action, _ACTION_MAX_LEN)
        detail_json = dump_json_object("detail", detail or {})
        with self._write(f"logging rollout {rollout_id}") as db:
            if _fetch_rollout(db, rollout_id) is None:
                raise ValueError(f"rollout {rollout_id} does not exist")
            ts = self._now()
            cursor = db.execute(
                "INSERT INTO rollout_steps (rollout_id, ts, action, step, weight, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [rollout_id, ts, action, step, weight, detail_json],
            )
        return _rollout_step(
            (cursor.lastrowid or 0, rollout_id, ts, action, step, weight, detail_json)
        )

    def rollout_steps(self, rollout_id: int) -> list[RolloutStep]:
        """A rollout's log, oldest first."""
        with self._read(f"reading the log of rollout {rollout_id}") as db:
            rows = db.execute(
                "SELECT id, rollout_id, ts, action, step, weight, detail FROM rollout_steps "
                "WHERE rollout_id = ? ORDER BY id",
                [rollout_id],
            ).fetchall()
        return [_rollout_step(r) for r in rows]


# -- rows ----------------------------------------------------------------------------


def _route(db: Database, name: str) -> RouteRecord:
    weights = {
        str(version): int(weight)
        for version, weight in db.execute(
            "SELECT r.version, r.weight FROM routes r JOIN versions v "
            "ON v.name = r.name AND v.version = r.version "
            "WHERE r.name = ? ORDER BY v.created_at, v.rowid",
            [name],
        ).fetchall()
    }
    row = db.execute("SELECT version, percent FROM shadows WHERE name = ?", [name]).fetchone()
    shadow = None if row is None else Shadow(version=str(row[0]), percent=float(row[1]))
    return RouteRecord(name=name, weights=weights, shadow=shadow)


def _require_version(db: Database, name: str, version: str) -> None:
    found = db.execute(
        "SELECT 1 FROM versions WHERE name = ? AND version = ?", [name, version]
    ).fetchone()
    if found is None:
        raise ValueError(f"{name}@{version} is not registered")


def _set_state(db: Database, name: str, version: str, state: str) -> None:
    db.execute(
        "UPDATE versions SET state = ? WHERE name = ? AND version = ?", [state, name, version]
    )


def _check_reason(reason: object) -> None:
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("reason must be a non-empty string")


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def _fetch_rollout(db: Database, rollout_id: int) -> dict[str, Any] | None:
    cursor = db.execute("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
    row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip([c[0] for c in cursor.description], row, strict=True))


def _rollout_step(row: Sequence[Any]) -> RolloutStep:
    """A ``rollout_steps`` row, its columns in table order, as the record: one mapping
    for the steps read back and the step just written."""
    return RolloutStep(
        id=int(row[0]),
        rollout_id=int(row[1]),
        ts=float(row[2]),
        action=row[3],
        step=int(row[4]),
        weight=int(row[5]),
        detail=load_json_object(row[6]),
    )


def _rollout(row: Mapping[str, Any] | None) -> RolloutRecord:
    assert row is not None
    return RolloutRecord(
        id=int(row["id"]),
        name=row["name"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        plan=load_json_object(row["plan"]),
        status=row["status"],
        step=int(row["step"]),
        step_started_at=float(row["step_started_at"]),
        reason=row["reason"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )
