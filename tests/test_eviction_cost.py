"""Cost-aware eviction: LFU with aging, Greedy-Dual-Size-Frequency and least reload
cost (pure, tables),
the scheduler's history they read, and what they do on the simulator."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import pytest

from policies import registry
from policies.eviction import (
    GreedyDualSizeFrequency,
    LeastFrequentlyUsed,
    LeastRecentlyUsed,
    LeastReloadCost,
    expected_reload_s,
)
from policies.types import Resident
from routerd.explain import explain
from routerd.metrics import Metrics
from routerd.scheduler import SchedulerSettings
from routerd.scheduler.history import MAX_VERSIONS, THRASH_WINDOW_S, History
from routerd.simulate.costs import ModelCost
from routerd.simulate.run import Host, simulate
from routerd.simulate.trace import TraceRequest
from tests.fakes import FakeBackend, FakeGpus
from tests.support import LedgerWatch, ask, one_gpu_services

GB = 10**9


def resident(name: str, **fields: object) -> Resident:
    values: dict[str, object] = {
        "model_id": name,
        "device": "cuda:0",
        "bytes": GB,
        "last_used": 0.0,
        "loaded_at": 0.0,
        "in_flight": 0,
        "pinned": False,
        "ready": True,
        **fields,
    }
    return Resident(**values)  # type: ignore[arg-type]


def victims(policy: object, residents: list[Resident], need: int, free: int = 0) -> object:
    return policy.victims(residents, need=need, free=free, now=100.0, min_residency=10.0)  # type: ignore[attr-defined]


LFU_CASES = [
    # (what, residents, need, free, victims)
    ("fits already", [resident("a")], GB, GB, ()),
    (
        "fewest uses first",
        [resident("a", uses=5.0), resident("b", uses=1.0), resident("c", uses=3.0)],
        2 * GB,
        0,
        ("b", "c"),
    ),
    (
        "equal uses: least recently used",
        [resident("a", uses=2.0, last_used=50.0), resident("b", uses=2.0, last_used=40.0)],
        GB,
        0,
        ("b",),
    ),
    (
        "busy, pinned, young and unready ones stay",
        [
            resident("busy", in_flight=1),
            resident("pinned", pinned=True),
            resident("young", loaded_at=95.0),
            resident("loading", ready=False),
            resident("idle", uses=9.0),
        ],
        GB,
        0,
        ("idle",),
    ),
    ("not enough evictable", [resident("a"), resident("b", in_flight=2)], 2 * GB, 0, None),
]


@pytest.mark.parametrize(("what", "residents", "need", "free", "expected"), LFU_CASES)
def test_lfu(what: str, residents: list[Resident], need: int, free: int, expected: object) -> None:
    assert victims(LeastFrequentlyUsed(), residents, need, free) == expected, what


GDSF_CASES = [
    (
        "cheap to reload goes first, whatever its recency",
        [
            resident("cheap", uses=4.0, reload_s=0.1, last_used=90.0),
            resident("dear", uses=4.0, reload_s=60.0, last_used=10.0),
        ],
        GB,
        ("cheap",),
    ),
    (
        "per byte: a large model costing as much to reload as a small one goes first",
        [
            resident("small", uses=2.0, reload_s=10.0, bytes=GB),
            resident("large", uses=2.0, reload_s=10.0, bytes=20 * GB),
        ],
        GB,
        ("large",),
    ),
    (
        "frequency counts: a rarely used dear model goes before a hot one",
        [
            resident("rare", uses=1.0, reload_s=10.0),
            resident("hot", uses=50.0, reload_s=2.0),
        ],
        GB,
        ("rare",),
    ),
    (
        "aging: a model last used at a low floor goes before one used since",
        [
            resident("old", uses=3.0, reload_s=5.0, floor=0.0),
            resident("recent", uses=3.0, reload_s=5.0, floor=40.0),
        ],
        GB,
        ("old",),
    ),
    (
        "never measured: its bytes at a second per GB",
        [resident("unknown", uses=2.0), resident("measured", uses=2.0, reload_s=3.0)],
        GB,
        ("unknown",),
    ),
]


@pytest.mark.parametrize(("what", "residents", "need", "expected"), GDSF_CASES)
def test_gdsf(what: str, residents: list[Resident], need: int, expected: object) -> None:
    assert victims(GreedyDualSizeFrequency(), residents, need) == expected, what


def test_gdsf_priority_is_floor_plus_uses_times_cost_per_gigabyte() -> None:
    policy = GreedyDualSizeFrequency()
    r = resident("a", uses=3.0, reload_s=6.0, bytes=2 * GB, floor=10.0)
    assert policy.priority(r) == pytest.approx(10.0 + 3.0 * 6.0 / 2.0)


def test_gdsf_gives_back_a_victim_the_last_one_taken_made_unneeded() -> None:
    """Lowest priority first takes the small one, then the large one; the large one
    alone frees enough, so the small one (worth more per byte) stays."""
    residents = [
        resident("small", uses=1.0, reload_s=1.0, bytes=GB),
        resident("large", uses=1.0, reload_s=8.0, bytes=4 * GB),
    ]
    assert victims(GreedyDualSizeFrequency(), residents, 3 * GB) == ("large",)


COST_CASES = [
    ("fits already", [resident("a")], GB, GB, ()),
    (
        "least reload seconds per byte first, whatever the recency",
        [
            resident("cheap", uses=4.0, reload_s=0.1, last_used=90.0),
            resident("dear", uses=4.0, reload_s=60.0, last_used=10.0),
        ],
        GB,
        0,
        ("cheap",),
    ),
    (
        "per byte: a large model goes before a small one that costs as much to reload",
        [
            resident("small", uses=2.0, reload_s=10.0, bytes=GB),
            resident("large", uses=2.0, reload_s=10.0, bytes=20 * GB),
        ],
        GB,
        0,
        ("large",),
    ),
    (
        "uses weigh: a rarely used dear model goes before a hot cheaper one",
        [resident("rare", uses=1.0, reload_s=10.0), resident("hot", uses=50.0, reload_s=2.0)],
        GB,
        0,
        ("rare",),
    ),
    (
        "no clock: the floor GDSF ages by changes nothing",
        [
            resident("old", uses=3.0, reload_s=5.0, floor=0.0),
            resident("recent", uses=3.0, reload_s=4.0, floor=40.0),
        ],
        GB,
        0,
        ("recent",),
    ),
    (
        "equal cost: least recently used",
        [
            resident("a", uses=2.0, reload_s=3.0, last_used=60.0),
            resident("b", uses=2.0, reload_s=3.0, last_used=30.0),
        ],
        GB,
        0,
        ("b",),
    ),
    (
        "a victim the next one made unneeded is given back",
        [
            resident("small", uses=1.0, reload_s=1.0, bytes=GB),
            resident("big", uses=1.0, reload_s=6.0, bytes=4 * GB),
            resident("dearer", uses=1.0, reload_s=2.0, bytes=GB),
        ],
        3 * GB,
        0,
        ("big",),
    ),
    (
        "busy, pinned, young and unready ones stay",
        [
            resident("busy", in_flight=1),
            resident("pinned", pinned=True),
            resident("young", loaded_at=95.0),
            resident("loading", ready=False),
            resident("idle", uses=9.0, reload_s=50.0),
        ],
        GB,
        0,
        ("idle",),
    ),
    ("not enough evictable", [resident("a"), resident("b", in_flight=2)], 2 * GB, 0, None),
]


@pytest.mark.parametrize(("what", "residents", "need", "free", "expected"), COST_CASES)
def test_least_reload_cost(
    what: str, residents: list[Resident], need: int, free: int, expected: object
) -> None:
    assert victims(LeastReloadCost(), residents, need, free) == expected, what


def test_expected_reload_seconds_are_uses_times_one_reload() -> None:
    assert expected_reload_s(resident("a", uses=3.0, reload_s=2.5)) == pytest.approx(7.5)
    assert expected_reload_s(resident("b", uses=0.2, reload_s=2.5)) == pytest.approx(2.5)
    assert expected_reload_s(resident("c", uses=2.0, bytes=3 * GB)) == pytest.approx(6.0)


def test_the_policies_are_registered_and_lru_is_unchanged() -> None:
    assert {"lru", "lfu", "gdsf", "cost"} <= set(registry.known("eviction"))
    assert isinstance(registry.create("eviction", "gdsf"), GreedyDualSizeFrequency)
    assert isinstance(registry.create("eviction", "cost"), LeastReloadCost)
    old = [resident("a", last_used=5.0, uses=99.0), resident("b", last_used=1.0)]
    assert victims(LeastRecentlyUsed(), old, GB) == ("b",)


def test_history_ages_counts_by_requests_and_prices_the_tier_it_would_go_to() -> None:
    half_life = [100.0]
    history = History(lambda: half_life[0])
    for _ in range(4):  # each request ages those before it by one request
        history.used("a@1", "cuda:0")
    four = sum(0.5 ** (k / 100) for k in range(4))
    assert history.weigh("a@1", "cuda:0", to_tier=False).uses == pytest.approx(four)
    for _ in range(100):  # a hundred requests to other versions: a half-life
        history.used("b@1", "cuda:0")
    assert history.weigh("a@1", "cuda:0", to_tier=False).uses == pytest.approx(four / 2)
    for _ in range(100):
        history.used("b@1", "cuda:0")
    assert history.weigh("a@1", "cuda:0", to_tier=False).uses == pytest.approx(four / 4)
    history.used("a@1", "cuda:0")  # aged to now, then one more
    again = four / 4 * 0.5 ** (1 / 100) + 1
    assert history.weigh("a@1", "cuda:0", to_tier=False).uses == pytest.approx(again)
    history.loaded("a@1", "cuda:0", 8.0, "disk")
    history.loaded("a@1", "cuda:1", 4.0, "disk")  # the same kind of device: one average
    assert history.weigh("a@1", "cuda:0", to_tier=False).reload_s == pytest.approx(7.2)
    assert history.weigh("a@1", "cuda:0", to_tier=True).reload_s == pytest.approx(0.72)
    history.loaded("a@1", "cuda:0", 0.5, "host")
    assert history.weigh("a@1", "cuda:0", to_tier=True).reload_s == 0.5
    assert history.weigh("a@1", "cpu", to_tier=False).reload_s == 0.0  # never there
    half_life[0] = math.inf  # a reload of the setting: counts stop fading
    for _ in range(1000):
        history.used("b@1", "cuda:0")
    assert history.weigh("a@1", "cuda:0", to_tier=False).uses == pytest.approx(again)
    assert history.weigh("never@1", "cuda:0", to_tier=False).uses == 0.0


def test_history_floors_rise_with_victims_and_stay_with_last_use() -> None:
    history = History(lambda: 1000.0)
    history.used("a@1", "cuda:0")
    history.evicted("cuda:0", 12.0)
    history.evicted("cuda:0", 5.0)  # never lower
    history.used("b@1", "cuda:0")
    history.used("c@1", "cuda:1")
    assert history.weigh("a@1", "cuda:0", to_tier=False).floor == 0.0
    assert history.weigh("b@1", "cuda:0", to_tier=False).floor == 12.0
    assert history.weigh("c@1", "cuda:1", to_tier=False).floor == 0.0


def test_history_keeps_a_bounded_number_of_versions() -> None:
    history = History(lambda: 1000.0)
    for n in range(MAX_VERSIONS + 5):
        history.used(f"m{n}@1", "cuda:0")
    assert history.weigh("m0@1", "cuda:0", to_tier=False).uses == 0.0  # forgotten
    newest = history.weigh(f"m{MAX_VERSIONS + 4}@1", "cuda:0", to_tier=False)
    assert newest.uses > 0


def test_on_the_simulator_gdsf_keeps_the_model_that_is_dear_to_reload() -> None:
    """Two cheap models and one dear one, room for two: LRU evicts whichever is
    oldest, the dear one too; GDSF keeps paying the cheap reloads instead."""
    costs = {
        "dear": ModelCost(bytes=GB, load_s=60.0, request_s=0.1),
        "cheap-a": ModelCost(bytes=GB, load_s=0.5, request_s=0.1),
        "cheap-b": ModelCost(bytes=GB, load_s=0.5, request_s=0.1),
    }
    trace = [
        TraceRequest(i * 100.0, ("dear", "cheap-a", "cheap-b")[i % 3], 1, 0) for i in range(30)
    ]
    settings = SchedulerSettings(
        min_residency=0.0, keep_alive=math.inf, headroom={"cuda": 0}, load_wait_timeout=120.0
    )
    host = replace(Host(memory=int(2.5 * GB), settings=settings))
    lru = simulate(trace, costs, host, "lru")
    gdsf = simulate(trace, costs, host, "gdsf")
    lfu = simulate(trace, costs, host, "lfu")
    assert lru.load_seconds > 10 * 60.0  # the dear model loaded again and again
    assert gdsf.load_seconds < 2 * 60.0  # loaded once (and the cheap ones often)
    assert gdsf.load_seconds < lfu.load_seconds <= lru.load_seconds


# -- thrash you can see ---------------------------------------------------------------


def test_history_tells_a_quick_comeback_and_two_that_displace_each_other() -> None:
    history = History(lambda: 3600.0)
    assert history.comeback("a@1", 0.0) is None  # never left
    history.left("a@1", 10.0, "b@1")
    history.left("b@1", 14.0, "a@1#1")  # b made room for a's replica: the same version
    back = history.comeback("a@1", 18.0)
    assert back is not None and (back.after_s, back.thrash, back.rival) == (8.0, True, "b@1")
    history.left("c@1", 0.0, None)  # idle past its keep-alive, for nobody
    late = history.comeback("c@1", 600.0)
    assert late is not None and (late.thrash, late.left_for, late.rival) == (False, None, None)


async def test_two_models_that_keep_evicting_each_other_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Room for one of two: a, b, a. a's second load is thrash, its event says how soon
    and for whom it left, the metric counts it, one warning names both, and
    ``routerctl why`` (explain) says so."""
    backend = FakeBackend(FakeGpus([10_000]))
    services = one_gpu_services(tmp_path, backend, size=6_000, host_cache=0, watch=LedgerWatch())
    metrics = Metrics()
    services.scheduler.observer = metrics
    try:
        for name in ("a", "b", "a"):
            await ask(services, name)
        loads = [e for e in services.store.events(limit=20) if e.kind == "load"]
        latest = loads[0]
        assert latest.model == "a" and latest.detail["thrash"] is True
        assert latest.detail["displaced_by"] == "b@1"
        assert 0 <= latest.detail["reloaded_after_s"] < THRASH_WINDOW_S
        assert "thrash" not in loads[-1].detail  # a's first load
        text = metrics.render().decode()
        assert 'routerd_thrash_total{model="a",version="1"} 1.0' in text
        assert any("keep displacing each other" in r.getMessage() for r in caplog.records)
        why = explain("a@1", services.store.events(limit=20, model="a"), time.time())
        assert "keep displacing each other" in why and "b@1" in why
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_under_gdsf_an_eviction_raises_the_devices_clock_to_its_victims_priority(
    tmp_path: Path,
) -> None:
    """Room for one of two: a, then b evicts a. The device's clock rises to a's
    priority as it was weighed for the plan, and b's next use carries that floor."""
    backend = FakeBackend(FakeGpus([10_000]))
    services = one_gpu_services(
        tmp_path,
        backend,
        size=6_000,
        host_cache=0,
        watch=LedgerWatch(),
        scheduler={"eviction": "gdsf"},
    )
    history = services.scheduler.residency.history
    try:
        await ask(services, "a")
        weighed = history.weigh("a@1", "cuda:0", to_tier=False)
        victim = resident("a@1", bytes=6_000, uses=weighed.uses, reload_s=weighed.reload_s)
        expected = GreedyDualSizeFrequency().priority(victim)
        assert history.weigh("b@1", "cuda:0", to_tier=False).floor == 0.0
        await ask(services, "b")  # evicts a
        assert [e.model for e in services.store.events(limit=20) if e.kind == "evict"] == ["a"]
        assert history.weigh("b@1", "cuda:0", to_tier=False).floor == pytest.approx(expected)
        assert expected > 0
    finally:
        await services.scheduler.close()
        services.store.close()
