"""The weighted sticky split (policies.split) and the router over routes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from policies.split import choose_version, mirrors, unit_hash
from routerd.router import Router
from state import RouteRecord, Shadow, VersionRecord

KEYS = [f"user-{i}" for i in range(10_000)]


def shares(weights: list[tuple[str, int]], keys: list[str]) -> dict[str, float]:
    counts = Counter(choose_version("m", weights, key, random.Random(0)) for key in keys)
    return {version: 100.0 * counts[version] / len(keys) for version, _ in weights}


def test_ten_thousand_keys_at_90_10_land_within_one_and_a_half_points() -> None:
    got = shares([("1", 90), ("2", 10)], KEYS)
    assert abs(got["1"] - 90) <= 1.5, got
    assert abs(got["2"] - 10) <= 1.5, got


def test_three_way_split_follows_the_weights() -> None:
    got = shares([("1", 5), ("2", 3), ("3", 2)], KEYS)
    for version, expected in (("1", 50), ("2", 30), ("3", 20)):
        assert abs(got[version] - expected) <= 1.5, got


def test_a_key_always_reaches_the_same_version() -> None:
    weights = [("1", 90), ("2", 10)]
    first = {key: choose_version("m", weights, key, random.Random(1)) for key in KEYS[:2000]}
    for _ in range(3):
        rng = random.Random()  # the choice must not depend on any random state
        assert all(choose_version("m", weights, k, rng) == v for k, v in first.items())
    assert set(first.values()) == {"1", "2"}


def test_a_weight_change_moves_as_few_keys_as_possible() -> None:
    before = {k: choose_version("m", [("1", 90), ("2", 10)], k, random.Random()) for k in KEYS}
    after = {k: choose_version("m", [("1", 75), ("2", 25)], k, random.Random()) for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    # The least any rule can move is the 15 points version 2 gained, all from version 1.
    assert 13.5 <= 100 * len(moved) / len(KEYS) <= 16.5
    assert all(before[k] == "1" and after[k] == "2" for k in moved)


def test_adding_a_version_only_takes_keys_to_it() -> None:
    before = {k: choose_version("m", [("1", 50), ("2", 50)], k, random.Random()) for k in KEYS}
    after = {
        k: choose_version("m", [("1", 50), ("2", 50), ("3", 25)], k, random.Random()) for k in KEYS
    }
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "3" for k in moved)
    assert 18 <= 100 * len(moved) / len(KEYS) <= 22  # 25 of 125


def test_without_a_key_the_draw_is_random_by_weight() -> None:
    rng = random.Random(7)
    counts = Counter(choose_version("m", [("1", 90), ("2", 10)], None, rng) for _ in KEYS)
    assert abs(counts["2"] / len(KEYS) - 0.10) <= 0.015


def test_zero_weights_never_win_and_all_zero_is_refused() -> None:
    assert {choose_version("m", [("1", 0), ("2", 3)], k, random.Random()) for k in KEYS[:500]} == {
        "2"
    }
    with pytest.raises(ValueError, match="weight above 0"):
        choose_version("m", [("1", 0)], "k", random.Random())


def test_hash_is_fixed_and_in_the_open_unit_interval() -> None:
    assert unit_hash("a", "m@1") == unit_hash("a", "m@1")
    assert unit_hash("a", "m@1") != unit_hash("a", "m@2")
    assert all(0 < unit_hash(k, "s") < 1 for k in KEYS[:100])


def test_mirrors_roughly_the_percent() -> None:
    rng = random.Random(3)
    hits = sum(mirrors(20, rng) for _ in KEYS)
    assert 1800 <= hits <= 2200
    assert all(mirrors(100, rng) for _ in range(50))


def record(version: str, created: float) -> VersionRecord:
    return VersionRecord("m", version, "echo", "/x", {}, "api", created, created)


def test_router_routes_by_weights_and_bypasses_them_for_name_at_version() -> None:
    records = [record("1", 1.0), record("2", 2.0), record("3", 3.0)]
    routes = [RouteRecord("m", {"1": 90, "2": 10}, Shadow("3", 100.0))]
    router = Router(records, routes, rng=random.Random(0))
    served = Counter(router.route("m", key).record.version for key in KEYS[:2000])
    assert set(served) == {"1", "2"}  # never 3, the newest: the route decides
    assert router.resolve("m").version == "1"  # the primary: the heaviest version
    pinned = router.route("m@3", "any")
    assert (pinned.record.version, pinned.shadow) == ("3", None)
    assert router.route("m", "k").shadow == records[2]


def test_router_without_routes_serves_the_newest_version() -> None:
    router = Router([record("1", 1.0), record("2", 2.0)])
    assert {router.route("m", k).record.version for k in KEYS[:100]} == {"2"}
    assert router.route("m").shadow is None
