"""Store schema 3: version states, routes, shadows, route history, rollouts."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

import state.migrations as migrations
from state import Store, VersionSpec
from tests.support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = Store.open(tmp_path / "routerd.db", clock=clock)
    yield opened
    opened.close()


def register(store: Store, *versions: str, name: str = "m") -> None:
    for version in versions:
        store.upsert_version(VersionSpec(name, version, "echo", f"/m/{version}"), source="api")


def states(store: Store) -> dict[str, str]:
    return {r.version: r.state for r in store.list_versions("m")}


def test_set_route_moves_states_and_appends_history(store: Store, clock: FakeClock) -> None:
    register(store, "1", "2")
    assert states(store) == {"1": "active", "2": "active"}  # no route yet: newest serves
    route = store.set_route("m", {"1": 100}, reason="pin to 1")
    assert route.weights == {"1": 100} and route.explicit
    register(store, "3")
    assert states(store)["3"] == "staged"  # the model has a route: no traffic yet
    clock.advance(1)
    store.set_route("m", {"1": 90, "3": 10}, reason="canary")
    clock.advance(1)
    store.set_route("m", {"3": 100}, reason="done")
    assert states(store) == {"1": "retired", "2": "active", "3": "active"}
    history = store.route_history("m")
    assert [(h.weights, h.reason) for h in history] == [
        ({"3": 100}, "done"),
        ({"1": 90, "3": 10}, "canary"),
        ({"1": 100}, "pin to 1"),
    ]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "at least one version"),
        ({"1": 0}, "above 0"),
        ({"1": -1}, "0.."),
        ({"1": 1.5}, "integer"),
        ({"9": 100}, "m@9 is not registered"),
        ({"bad version": 1}, "whitespace"),
    ],
)
def test_bad_routes_are_refused_and_change_nothing(
    store: Store, weights: dict[str, int], message: str
) -> None:
    register(store, "1")
    store.set_route("m", {"1": 100}, reason="start")
    with pytest.raises(ValueError, match=message):
        store.set_route("m", weights, reason="bad")
    assert store.route("m").weights == {"1": 100}
    assert len(store.route_history("m")) == 1


def test_shadow_set_replace_clear(store: Store) -> None:
    register(store, "1", "2", "3")
    store.set_shadow("m", "2", 20, reason="try 2")
    store.set_shadow("m", "3", 5.5, reason="try 3")
    route = store.route("m")
    assert route.shadow is not None and (route.shadow.version, route.shadow.percent) == ("3", 5.5)
    assert not route.explicit and [r.name for r in store.routes()] == ["m"]
    with pytest.raises(ValueError, match="percent"):
        store.set_shadow("m", "3", 0, reason="x")
    assert store.clear_shadow("m", reason="off")
    assert not store.clear_shadow("m", reason="off")
    assert store.route("m").shadow is None
    assert [h.shadow for h in store.route_history("m")] == [
        None,
        {"version": "3", "percent": 5.5},
        {"version": "2", "percent": 20.0},
    ]


def test_deleting_a_version_leaves_its_routes_and_shadow(store: Store) -> None:
    register(store, "1", "2")
    store.set_route("m", {"1": 50, "2": 50}, reason="split")
    store.set_shadow("m", "2", 10, reason="s")
    assert store.delete_version("m", "2")
    route = store.route("m")
    assert (route.weights, route.shadow) == ({"1": 50}, None)
    assert len(store.route_history("m")) == 2  # history is never rewritten


def test_one_live_rollout_per_model_and_its_log(store: Store) -> None:
    register(store, "1", "2")
    plan = {"steps": [50, 100]}
    first = store.create_rollout("m", "1", "2", plan, step_started_at=5.0)
    assert (first.status, first.step, first.live) == ("running", 0, True)
    with pytest.raises(ValueError, match="already in progress"):
        store.create_rollout("m", "1", "2", plan, step_started_at=5.0)
    store.record_rollout_step(first.id, "step", step=0, weight=50, detail={"a": 1})
    paused = store.update_rollout(first.id, status="paused", step=1, step_started_at=9.0)
    assert (paused.status, paused.step, paused.step_started_at) == ("paused", 1, 9.0)
    assert [r.id for r in store.rollouts(name="m", live=True)] == [first.id]
    store.update_rollout(first.id, status="promoted", reason="healthy")
    assert store.rollouts(live=True) == []
    second = store.create_rollout("m", "2", "1", plan, step_started_at=10.0)
    assert [r.id for r in store.rollouts(name="m")] == [second.id, first.id]
    assert [(s.action, s.weight, s.detail) for s in store.rollout_steps(first.id)] == [
        ("step", 50, {"a": 1})
    ]
    with pytest.raises(ValueError, match="status"):
        store.update_rollout(second.id, status="exploded")


def test_upgrade_from_schema_2_keeps_every_row(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:2])
        old = Store.open(path, clock=clock)
        assert old.schema_version == 2
        old.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO models (name, created_at) VALUES ('m', 1)")
        conn.execute(
            "INSERT INTO versions (name, version, backend, path, options, source, created_at, "
            "updated_at) VALUES ('m', '1', 'echo', '/m/1', '{}', 'api', 1, 1)"
        )
        conn.execute("INSERT INTO pins (name, version, pinned_at) VALUES ('m', '1', 2)")
        conn.execute("INSERT INTO events (ts, kind, model, version) VALUES (3, 'load', 'm', '1')")
    new = Store.open(path, clock=clock)
    try:
        assert new.schema_version == migrations.latest_version()
        [version] = new.list_versions()
        assert (version.model_id, version.state, version.created_at) == ("m@1", "active", 1.0)
        assert new.pinned_versions() == [("m", "1")]
        assert [e.kind for e in new.events()] == ["load"]
        assert new.set_route("m", {"1": 100}, reason="after upgrade").weights == {"1": 100}
    finally:
        new.close()
