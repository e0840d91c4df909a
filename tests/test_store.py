"""The store's promises: migrations, the version registry, sync by source, pins,
footprints, events, errors."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import state.migrations as migrations
from state import (
    Event,
    FootprintRecord,
    Store,
    StoreError,
    SyncResult,
    VersionRecord,
    VersionSpec,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "routerd.db"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = Store.open(db_path, clock=clock)
    yield opened
    opened.close()


def spec(
    name: str = "llama",
    version: str = "1",
    *,
    backend: str = "transformers",
    path: str | None = None,
    options: dict[str, Any] | None = None,
) -> VersionSpec:
    return VersionSpec(
        name=name,
        version=version,
        backend=backend,
        path=path if path is not None else f"/models/{name}/{version}",
        options=options or {},
    )


def ids(store: Store) -> list[tuple[str, str]]:
    return [(r.model_id, r.source) for r in store.list_versions()]


def model_rows(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT name FROM models ORDER BY name")]


# -- opening and migrations -----------------------------------------------------------


def test_open_creates_dir_wal_and_foreign_keys(store: Store, db_path: Path) -> None:
    assert store.is_open
    assert db_path.is_file()
    assert store.schema_version == migrations.latest_version() == 4
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {
        "schema_migrations",
        "models",
        "versions",
        "events",
        "events_model_ts",
        "pins",
        "footprints",
    } <= tables
    assert store.integrity_ok()


def test_migrations_are_numbered_without_gaps() -> None:
    assert [m.version for m in migrations.MIGRATIONS] == list(
        range(1, len(migrations.MIGRATIONS) + 1)
    )


def test_reopen_keeps_data_and_applies_nothing_twice(db_path: Path, clock: FakeClock) -> None:
    first = Store.open(db_path, clock=clock)
    first.upsert_version(spec(), source="config")
    first.record_event("load", "llama", "1", device="cpu")
    first.close()
    assert not first.is_open

    clock.advance()
    again = Store.open(db_path, clock=clock)
    try:
        assert again.schema_version == 4
        assert [r.model_id for r in again.list_versions()] == ["llama@1"]
        assert [e.kind for e in again.events()] == ["load"]
    finally:
        again.close()
    with sqlite3.connect(db_path) as conn:
        applied = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    assert applied == [
        (1, "initial", 1_000.0),
        (2, "pins_footprints_event_details", 1_000.0),
        (3, "routes_rollouts", 1_000.0),
        (4, "request_log", 1_000.0),
    ]


def test_pending_migration_applied_on_reopen_and_failure_rolls_back(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.open(db_path, clock=clock).close()
    released = migrations.MIGRATIONS
    newest = migrations.latest_version()

    broken = migrations._run(["CREATE TABLE half_done (x)", "CREATE TABLE nope (("])
    bad = (*released, migrations.Migration(newest + 1, "broken", broken))
    monkeypatch.setattr(migrations, "MIGRATIONS", bad)
    with pytest.raises(StoreError, match=r"opening the store failed"):
        Store.open(db_path, clock=clock)
    with sqlite3.connect(db_path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        assert "half_done" not in tables
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (newest,)

    good = migrations._run(["CREATE TABLE later_feature (name TEXT PRIMARY KEY)"])
    monkeypatch.setattr(
        migrations,
        "MIGRATIONS",
        (*released, migrations.Migration(newest + 1, "later_feature", good)),
    )
    upgraded = Store.open(db_path, clock=clock)
    assert upgraded.schema_version == newest + 1
    upgraded.close()


def test_upgrade_from_schema_1_keeps_every_row(
    db_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file as routerd at schema 1 left it: its registry and events as that code wrote them.
    with monkeypatch.context() as patch:
        patch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:1])
        old = Store.open(db_path, clock=clock)
        assert old.schema_version == 1
        old.close()
    versions_before = [
        VersionRecord("llama", "1", "transformers", "/m/l1", {"dtype": "bf16"}, "config", 1.0, 1.0),
        VersionRecord("llama", "2", "transformers", "/m/l2", {}, "api", 2.0, 2.0),
        VersionRecord("embed", "1", "transformers", "/m/e1", {}, "demo", 3.0, 3.0),
    ]
    with sqlite3.connect(db_path) as conn:
        assert "trigger" not in [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        conn.executemany(
            "INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)",
            [(r.name, r.created_at) for r in versions_before],
        )
        conn.executemany(
            "INSERT INTO versions (name, version, backend, path, options, source, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.name,
                    r.version,
                    r.backend,
                    r.path,
                    json.dumps(r.options),
                    r.source,
                    r.created_at,
                    r.updated_at,
                )
                for r in versions_before
            ],
        )
        conn.executemany(
            "INSERT INTO events (ts, kind, model, version, device, reason, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (1_000.0, "load", "llama", "1", "cuda:0", None, '{"bytes":7}'),
                (1_001.0, "evict", "llama", "1", "cuda:0", "admin", "{}"),
                (1_001.0, "load_failed", "embed", "1", None, "no such file", "{}"),
            ],
        )

    clock.advance(61)
    new = Store.open(db_path, clock=clock)
    try:
        assert new.schema_version == migrations.latest_version()
        assert new.list_versions() == sorted(versions_before, key=lambda r: r.name)
        assert {r.state for r in new.list_versions()} == {"active"}
        assert [(e.id, e.kind, e.model_id, e.device, e.reason, e.detail) for e in new.events()] == [
            (3, "load_failed", "embed@1", None, "no such file", {}),
            (2, "evict", "llama@1", "cuda:0", "admin", {}),
            (1, "load", "llama@1", "cuda:0", None, {"bytes": 7}),
        ]
        assert all((e.bytes, e.duration_ms, e.trigger) == (None, None, None) for e in new.events())
        assert new.pinned_versions() == []
        assert new.measured_footprint("llama", "1", "cuda") is None

        # The new tables and columns work on the upgraded file, foreign keys included.
        new.set_pinned("llama", "1", True)
        new.record_footprint(
            "llama",
            "1",
            "cuda",
            measured={"weights": 1, "runtime": 2, "working": 3},
            estimated_bytes=5,
        )
        event = new.record_event("evict", "llama", "2", bytes=9, duration_ms=1.5, trigger="x@1")
        assert (event.id, event.bytes, event.duration_ms, event.trigger) == (4, 9, 1.5, "x@1")
        assert new.pinned_versions() == [("llama", "1")]
        assert new.delete_version("llama", "1")
        assert new.pinned_versions() == []
        assert new.measured_footprint("llama", "1", "cuda") is None
    finally:
        new.close()
    with sqlite3.connect(db_path) as conn:
        applied = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    assert applied == [(1, 1_000.0), (2, 1_061.0), (3, 1_061.0), (4, 1_061.0)]


def test_newer_schema_is_refused(db_path: Path, clock: FakeClock) -> None:
    Store.open(db_path, clock=clock).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (7, 'future', 0)")
    with pytest.raises(StoreError, match=r"database schema 7 is newer than this routerd \(4\)"):
        Store.open(db_path, clock=clock)


def test_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is a text file, not SQLite\n" * 64)
    with pytest.raises(StoreError, match=r"is not a SQLite database") as caught:
        Store.open(db_path)
    assert str(db_path) in str(caught.value)


def test_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"cannot create directory"):
        Store.open(blocker / "state" / "routerd.db")


def test_locked_database_is_a_store_error(db_path: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.db"
    holder = sqlite3.connect(fresh, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process mid-write
        with pytest.raises(StoreError, match=r"opening the store failed: .* is locked"):
            Store.open(fresh, busy_timeout=0.01)
    finally:
        holder.close()

    store = Store.open(db_path, busy_timeout=0.01)
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"registering llama@1 failed: .* is locked"):
            store.upsert_version(spec(), source="api")
        assert store.list_versions() == []  # readers are not blocked (WAL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.upsert_version(spec(), source="api")  # nothing half-written; usable again
    assert [r.model_id for r in store.list_versions()] == ["llama@1"]
    store.close()


def test_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match=r"is closed"):
        store.list_versions()


# -- versions -------------------------------------------------------------------------


def test_upsert_keeps_created_at_and_bumps_updated_at(store: Store, clock: FakeClock) -> None:
    first = store.upsert_version(spec(options={"dtype": "bf16"}), source="config")
    assert (first.created_at, first.updated_at, first.source) == (1_000.0, 1_000.0, "config")
    assert first.model_id == "llama@1"

    clock.advance(5)
    second = store.upsert_version(spec(path="/elsewhere", options={}), source="api")
    assert (second.created_at, second.updated_at) == (1_000.0, 1_005.0)
    assert (second.path, second.options, second.source) == ("/elsewhere", {}, "api")
    assert store.get_version("llama", "1") == second
    assert store.get_version("llama", "2") is None


def test_options_round_trip_as_json(store: Store) -> None:
    options = {
        "dtype": "bf16",
        "max_batch": 8,
        "ratio": 0.5,
        "on": True,
        "none": None,
        "nested": {"stop": ["</s>", "\n"], "unicode": "é✓"},
    }
    store.upsert_version(spec(options=options), source="api")
    assert store.get_version("llama", "1").options == options  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"options must be JSON-serializable"):
        store.upsert_version(spec(options={"bad": object()}), source="api")
    with pytest.raises(ValueError, match=r"options must be JSON-serializable"):
        store.upsert_version(spec(options={"nan": float("nan")}), source="api")


def test_list_orders_by_name_then_created_then_insertion(store: Store, clock: FakeClock) -> None:
    store.upsert_version(spec("zeta", "1"), source="api")
    clock.advance()
    store.upsert_version(spec("alpha", "b"), source="api")
    store.upsert_version(spec("alpha", "a"), source="api")  # same instant: insertion order
    clock.advance(-10)  # a clock that went backwards still orders by created_at
    store.upsert_version(spec("alpha", "old"), source="api")
    clock.advance(20)
    store.upsert_version(spec("alpha", "b"), source="config")  # update keeps its place

    assert [r.model_id for r in store.list_versions()] == [
        "alpha@old",
        "alpha@b",
        "alpha@a",
        "zeta@1",
    ]
    assert [r.version for r in store.list_versions("alpha")] == ["old", "b", "a"]
    assert store.list_versions("nobody") == []


def test_delete_removes_model_row_with_last_version(store: Store, db_path: Path) -> None:
    store.upsert_version(spec("llama", "1"), source="api")
    store.upsert_version(spec("llama", "2"), source="api")
    assert model_rows(db_path) == ["llama"]

    assert store.delete_version("llama", "1")
    assert model_rows(db_path) == ["llama"]
    assert not store.delete_version("llama", "1")
    assert store.delete_version("llama", "2")
    assert model_rows(db_path) == []
    assert store.list_versions() == []


def test_model_row_created_with_first_version(
    store: Store, clock: FakeClock, db_path: Path
) -> None:
    store.upsert_version(spec("llama", "1"), source="api")
    clock.advance()
    store.upsert_version(spec("llama", "2"), source="api")
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT name, created_at FROM models").fetchall() == [
            ("llama", 1_000.0)
        ]


# -- sync -----------------------------------------------------------------------------


def test_sync_adds_updates_removes_only_its_source(store: Store, clock: FakeClock) -> None:
    store.upsert_version(spec("api-model", "1"), source="api")
    store.upsert_version(spec("demo-small", "1"), source="demo")

    first = store.sync_versions([spec("a", "1"), spec("b", "1")], source="config")
    assert first == SyncResult(added=["a@1", "b@1"], updated=[], removed=[])

    clock.advance()
    same = store.sync_versions([spec("a", "1"), spec("b", "1")], source="config")
    assert same == SyncResult(added=[], updated=[], removed=[])
    assert store.get_version("a", "1").updated_at == 1_000.0  # type: ignore[union-attr]

    clock.advance()
    result = store.sync_versions(
        [spec("a", "1", options={"device": "cpu"}), spec("c", "2")], source="config"
    )
    assert result == SyncResult(added=["c@2"], updated=["a@1"], removed=["b@1"])
    a = store.get_version("a", "1")
    assert a is not None
    assert (a.options, a.created_at, a.updated_at) == ({"device": "cpu"}, 1_000.0, 1_002.0)
    assert ids(store) == [
        ("a@1", "config"),
        ("api-model@1", "api"),
        ("c@2", "config"),
        ("demo-small@1", "demo"),
    ]

    assert store.sync_versions([], source="config") == SyncResult(
        added=[], updated=[], removed=["a@1", "c@2"]
    )
    assert ids(store) == [("api-model@1", "api"), ("demo-small@1", "demo")]


def test_sync_takes_over_rows_of_other_sources(store: Store, clock: FakeClock) -> None:
    registered = store.upsert_version(spec("llama", "1"), source="api")
    clock.advance()
    result = store.sync_versions([spec("llama", "1")], source="config")
    assert result == SyncResult(added=[], updated=["llama@1"], removed=[])
    taken = store.get_version("llama", "1")
    assert taken is not None
    assert (taken.source, taken.created_at) == ("config", registered.created_at)

    # Now config owns it: dropping it from config removes it; api syncs never touch it.
    assert store.sync_versions([], source="api") == SyncResult([], [], [])
    assert store.sync_versions([], source="config").removed == ["llama@1"]


def test_sync_is_all_or_nothing(store: Store) -> None:
    store.sync_versions([spec("a", "1")], source="config")
    with pytest.raises(ValueError, match=r"b@1 appears twice"):
        store.sync_versions([spec("b", "1"), spec("b", "1")], source="config")
    with pytest.raises(ValueError, match=r"name 'bad name' must not contain whitespace"):
        store.sync_versions([spec("c", "1"), spec("bad name", "1")], source="config")
    assert ids(store) == [("a@1", "config")]


# -- pins -----------------------------------------------------------------------------


def test_pin_unpin_is_idempotent_and_needs_a_registered_version(
    store: Store, clock: FakeClock, db_path: Path
) -> None:
    store.upsert_version(spec("llama", "1"), source="api")
    store.upsert_version(spec("llama", "2"), source="api")
    store.upsert_version(spec("alpha", "1"), source="api")
    assert not store.is_pinned("llama", "1")

    store.set_pinned("llama", "2", True)
    clock.advance()
    store.set_pinned("llama", "2", True)  # again: still one pin, first time kept
    store.set_pinned("alpha", "1", True)
    assert store.is_pinned("llama", "2")
    assert not store.is_pinned("llama", "1")
    assert store.pinned_versions() == [("alpha", "1"), ("llama", "2")]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT pinned_at FROM pins WHERE name = 'llama'").fetchall() == [
            (1_000.0,)
        ]

    store.set_pinned("llama", "2", False)
    store.set_pinned("llama", "2", False)
    store.set_pinned("llama", "1", False)  # never pinned: nothing to do
    assert store.pinned_versions() == [("alpha", "1")]

    with pytest.raises(ValueError, match=r"llama@9 is not registered"):
        store.set_pinned("llama", "9", True)
    with pytest.raises(ValueError, match=r"nobody@1 is not registered"):
        store.set_pinned("nobody", "1", False)
    with pytest.raises(ValueError, match=r"pinned must be a boolean"):
        store.set_pinned("llama", "1", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"name 'a b' must not contain whitespace"):
        store.is_pinned("a b", "1")
    assert store.pinned_versions() == [("alpha", "1")]


def test_pin_survives_reregistration_and_goes_with_the_version(store: Store) -> None:
    store.upsert_version(spec("llama", "1"), source="config")
    store.set_pinned("llama", "1", True)
    store.upsert_version(spec("llama", "1", path="/moved"), source="api")
    store.sync_versions([spec("llama", "1", options={"dtype": "bf16"})], source="config")
    assert store.is_pinned("llama", "1")

    assert store.sync_versions([], source="config").removed == ["llama@1"]
    assert store.pinned_versions() == []
    store.upsert_version(spec("llama", "1"), source="api")  # registered anew: not pinned
    assert not store.is_pinned("llama", "1")


# -- footprints -----------------------------------------------------------------------


def parts(weights: int, runtime: int = 0, working: int = 0) -> dict[str, int]:
    return {"weights": weights, "runtime": runtime, "working": working}


def test_footprint_round_trip_per_device_kind(store: Store, clock: FakeClock) -> None:
    store.upsert_version(spec("llama", "1"), source="api")
    assert store.measured_footprint("llama", "1", "cuda") is None

    store.record_footprint("llama", "1", "cuda", measured=parts(100, 20, 3), estimated_bytes=110)
    store.record_footprint("llama", "1", "cpu", measured=parts(100), estimated_bytes=None)
    assert store.measured_footprint("llama", "1", "cuda") == FootprintRecord(
        name="llama",
        version="1",
        device_kind="cuda",
        estimated_bytes=110,
        measured_bytes=123,
        weights_bytes=100,
        runtime_bytes=20,
        working_bytes=3,
        measured_at=1_000.0,
    )
    cpu = store.measured_footprint("llama", "1", "cpu")
    assert cpu is not None
    assert (cpu.measured_bytes, cpu.estimated_bytes, cpu.model_id) == (100, None, "llama@1")

    clock.advance(10)  # a new measurement replaces the old one for that kind
    store.record_footprint("llama", "1", "cuda", measured=parts(100, 40, 5), estimated_bytes=130)
    again = store.measured_footprint("llama", "1", "cuda")
    assert again is not None
    assert (again.measured_bytes, again.estimated_bytes, again.measured_at) == (145, 130, 1_010.0)
    assert store.measured_footprint("llama", "1", "cpu") == cpu


@pytest.mark.parametrize(
    ("measured", "estimated", "message"),
    [
        (
            {"weights": 1, "runtime": 2},
            None,
            r"exactly the keys weights, runtime, working; missing working",
        ),
        ({**parts(1), "kv": 2}, None, r"; unknown kv"),
        (parts(-1), None, r"measured.weights must not be negative"),
        (parts(1, True), None, r"measured.runtime must be an integer, got bool"),
        (parts(1, 0, 2.5), None, r"measured.working must be an integer, got float"),
        (parts(1), -5, r"estimated_bytes must not be negative"),
        ([1, 2, 3], None, r"measured must be a mapping"),
    ],
)
def test_bad_footprints_are_refused(
    store: Store, measured: Any, estimated: Any, message: str
) -> None:
    store.upsert_version(spec("llama", "1"), source="api")
    with pytest.raises(ValueError, match=message):
        store.record_footprint("llama", "1", "cuda", measured=measured, estimated_bytes=estimated)
    assert store.measured_footprint("llama", "1", "cuda") is None


def test_footprint_needs_a_registered_version_and_a_device_kind(store: Store) -> None:
    with pytest.raises(ValueError, match=r"llama@1 is not registered"):
        store.record_footprint("llama", "1", "cuda", measured=parts(1), estimated_bytes=None)
    store.upsert_version(spec("llama", "1"), source="api")
    with pytest.raises(ValueError, match=r"device_kind must not be empty"):
        store.record_footprint("llama", "1", "", measured=parts(1), estimated_bytes=None)
    with pytest.raises(ValueError, match=r"device_kind 'cuda 0' must not contain whitespace"):
        store.measured_footprint("llama", "1", "cuda 0")


def test_changed_files_drop_footprints_but_touching_keeps_them(store: Store) -> None:
    def measure(name: str) -> None:
        for kind in ("cpu", "cuda"):
            store.record_footprint(name, "1", kind, measured=parts(8), estimated_bytes=None)

    def kinds(name: str) -> list[str]:
        return [k for k in ("cpu", "cuda") if store.measured_footprint(name, "1", k)]

    for name in ("path", "options", "backend", "same", "synced", "takeover"):
        store.upsert_version(spec(name, "1"), source="config")
        measure(name)

    store.upsert_version(spec("path", "1", path="/elsewhere"), source="config")
    store.upsert_version(spec("options", "1", options={"dtype": "bf16"}), source="config")
    store.upsert_version(spec("backend", "1", backend="vllm"), source="config")
    store.upsert_version(spec("same", "1"), source="api")  # only the source changes
    result = store.sync_versions(
        [
            spec("path", "1", path="/elsewhere"),
            spec("options", "1", options={"dtype": "bf16"}),
            spec("backend", "1", backend="vllm"),
            spec("synced", "1", options={"max_context": 512}),
        ],
        source="config",
    )
    assert result.updated == ["synced@1"]
    assert result.removed == ["takeover@1"]
    store.upsert_version(spec("takeover", "1"), source="config")
    measure("takeover")
    store.sync_versions([spec("takeover", "1")], source="demo")  # takes it over, same files

    assert [kinds(n) for n in ("path", "options", "backend", "synced")] == [[], [], [], []]
    assert kinds("same") == ["cpu", "cuda"]
    assert kinds("takeover") == ["cpu", "cuda"]

    measure("path")
    assert store.delete_version("path", "1")
    store.upsert_version(spec("path", "1", path="/elsewhere"), source="api")
    assert kinds("path") == []


# -- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version", "message"),
    [
        ("", "1", r"name must not be empty"),
        ("llama", "", r"version must not be empty"),
        ("lla ma", "1", r"name 'lla ma' must not contain whitespace"),
        ("llama", "1\t", r"version '1\\t' must not contain whitespace"),
        ("llama@2", "1", r"name 'llama@2' must not contain '@'"),
        ("llama", "a@b", r"version 'a@b' must not contain '@'"),
        ("org/llama", "1", r"name 'org/llama' must not contain '/'"),
        ("llama", "v/1", r"version 'v/1' must not contain '/'"),
        ("llamä", "1", r"name 'llamä' contains 'ä'; only letters, digits"),
        ("llama", "1+cpu", r"version '1\+cpu' contains '\+'"),
        ("x" * 129, "1", r"name is 129 characters long; at most 128"),
        ("llama", "v" * 65, r"version is 65 characters long; at most 64"),
    ],
)
def test_invalid_names_are_refused(store: Store, name: str, version: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.upsert_version(spec(name, version), source="api")
    assert store.list_versions() == []


def test_valid_identifiers_and_other_fields(store: Store) -> None:
    record = store.upsert_version(spec("Org.Llama_3-8b:instruct", "2024.05-rc_1:a"), source="api")
    assert record.model_id == "Org.Llama_3-8b:instruct@2024.05-rc_1:a"
    with pytest.raises(ValueError, match=r"backend must not be empty"):
        store.upsert_version(spec(backend=""), source="api")
    with pytest.raises(ValueError, match=r"path must not be empty"):
        store.upsert_version(spec(path=" "), source="api")
    with pytest.raises(ValueError, match=r"source must be one of config, api, demo"):
        store.upsert_version(spec(), source="elsewhere")
    with pytest.raises(ValueError, match=r"name must not be empty"):
        store.get_version("", "1")
    with pytest.raises(ValueError, match=r"version 'a b' must not contain whitespace"):
        store.delete_version("llama", "a b")


# -- events ---------------------------------------------------------------------------


def test_events_newest_first_and_filtered(store: Store, clock: FakeClock) -> None:
    first = store.record_event("load", "llama", "1", device="cuda:0", detail={"bytes": 123})
    clock.advance()
    store.record_event("load", "mistral", "2", device="cpu")
    store.record_event("evict", "llama", "1", device="cuda:0", reason="idle", detail={"idle_s": 60})

    assert (first.id, first.ts, first.detail, first.reason) == (1, 1_000.0, {"bytes": 123}, None)
    assert [(e.kind, e.model) for e in store.events()] == [
        ("evict", "llama"),
        ("load", "mistral"),
        ("load", "llama"),
    ]
    llama = store.events(model="llama")
    assert [(e.kind, e.reason, e.detail) for e in llama] == [
        ("evict", "idle", {"idle_s": 60}),
        ("load", None, {"bytes": 123}),
    ]
    assert llama[-1] == first
    assert [e.model for e in store.events(limit=1)] == ["llama"]
    assert store.events(model="nobody") == []
    with pytest.raises(ValueError, match=r"limit must be a positive integer"):
        store.events(limit=0)
    with pytest.raises(ValueError, match=r"kind must not be empty"):
        store.record_event("", "llama", "1")
    with pytest.raises(ValueError, match=r"detail must be JSON-serializable"):
        store.record_event("load", "llama", "1", detail={"x": {1, 2}})


def test_event_details_round_trip(store: Store, clock: FakeClock) -> None:
    load = store.record_event(
        "load", "llama", "1", device="cuda:0", reason="request", bytes=2_000, duration_ms=812.5
    )
    clock.advance(30)
    evict = store.record_event(
        "evict",
        "llama",
        "1",
        device="cuda:0",
        reason="lru",
        bytes=2_000,
        duration_ms=3,
        trigger="mistral@2",
    )
    leak = store.record_event("leak", "llama", "1", device="cuda:0", bytes=64)
    assert evict == Event(
        id=2,
        ts=1_030.0,
        kind="evict",
        model="llama",
        version="1",
        device="cuda:0",
        reason="lru",
        detail={},
        bytes=2_000,
        duration_ms=3.0,
        trigger="mistral@2",
    )
    assert evict.model_id == "llama@1"
    assert store.events() == [leak, evict, load]
    assert (load.bytes, load.duration_ms, load.trigger) == (2_000, 812.5, None)


def test_events_of_one_version(store: Store) -> None:
    store.record_event("load", "llama", "1")
    store.record_event("load", "llama", "2")
    store.record_event("evict", "llama", "1")
    store.record_event("load", "mistral", "1")
    assert [(e.kind, e.version) for e in store.events(model="llama", version="1")] == [
        ("evict", "1"),
        ("load", "1"),
    ]
    assert [e.kind for e in store.events(model="llama", version="1", limit=1)] == ["evict"]
    assert store.events(model="llama", version="3") == []
    with pytest.raises(ValueError, match=r"version needs model"):
        store.events(version="1")
    with pytest.raises(ValueError, match=r"version 'a b' must not contain whitespace"):
        store.events(model="llama", version="a b")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bytes": -1}, r"bytes must not be negative"),
        ({"bytes": 1.5}, r"bytes must be an integer, got float"),
        ({"bytes": False}, r"bytes must be an integer, got bool"),
        ({"duration_ms": -0.1}, r"duration_ms must be a finite, non-negative number"),
        ({"duration_ms": float("inf")}, r"duration_ms must be a finite, non-negative number"),
        ({"duration_ms": "3"}, r"duration_ms must be a number, got str"),
        ({"trigger": ""}, r"trigger must not be empty"),
        ({"trigger": 7}, r"trigger must be a string"),
    ],
)
def test_bad_event_details_are_refused(store: Store, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.record_event("evict", "llama", "1", **fields)
    assert store.events() == []
