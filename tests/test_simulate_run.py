"""The simulator runs the daemon's scheduler: policies, settings and the tier move its
results as they move the daemon's; Belady's rule is the bound; ``summarize`` counts."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from policies.eviction import RankedEviction
from policies.types import Resident
from routerd.scheduler import SchedulerSettings
from routerd.simulate.costs import ModelCost
from routerd.simulate.generate import Workload, costs_for, generate
from routerd.simulate.report import Outcome, render, summarize
from routerd.simulate.run import BELADY, Host, simulate
from routerd.simulate.trace import TraceRequest
from state import Event

GB = 10**9
SETTINGS = SchedulerSettings(min_residency=0.0, keep_alive=float("inf"), headroom={"cuda": 0})
EQUAL = {m: ModelCost(bytes=GB, load_s=1.0, host_s=0.1, request_s=0.1) for m in "abc"}


def cyclic(rounds: int, gap: float = 10.0) -> list[TraceRequest]:
    """a, b, c, a, b, c, …: the trace on which LRU with room for two never hits."""
    return [TraceRequest(i * gap, "abc"[i % 3], 10, 0) for i in range(3 * rounds)]


def two_of_three(**changes: object) -> Host:
    return replace(Host(memory=int(2.5 * GB), settings=SETTINGS), **changes)  # type: ignore[arg-type]


class MostRecentlyUsed(RankedEviction):
    """Evicts the instance used last: the cure for a cyclic trace, a test's own policy."""

    name = "mru"

    def rank(self, resident: Resident, now: float) -> tuple[Any, ...]:
        return (-resident.last_used, resident.model_id)


def test_lru_misses_every_request_of_a_cycle_longer_than_the_room() -> None:
    result = simulate(cyclic(10), EQUAL, two_of_three(), "lru")
    assert result.policy == "lru" and result.requests == result.served == 30
    assert result.hits == 0 and result.loads == 30 and result.evictions == 28 + 2
    assert result.load_seconds == pytest.approx(30.0)  # each load: its table's second
    assert result.waited == 30 and result.waited_p50_ms == pytest.approx(1000.0)
    assert result.bytes_moved == 30 * GB
    assert result.thrash == 27  # all but the first three loads come back within 60 s


def test_a_policy_passed_in_is_the_one_that_decides() -> None:
    """The simulator runs whatever policy code the scheduler is given: change the
    policy, and the result moves as the daemon's would."""
    lru = simulate(cyclic(10), EQUAL, two_of_three(), "lru")
    mru = simulate(cyclic(10), EQUAL, two_of_three(), MostRecentlyUsed())
    assert mru.policy == "mru"
    assert mru.hits >= 9 and mru.loads < lru.loads


def test_belady_is_never_beaten_on_equal_sizes_and_costs() -> None:
    workload = Workload(kind="zipf", requests=600, models=6, rate=0.2, alpha=0.8, seed=7)
    trace = generate(workload)
    costs = {m: replace(c, per_token_s=0.0, request_s=0.01) for m, c in costs_for(workload).items()}
    host = Host(memory=3 * workload.size + GB, settings=SETTINGS)
    lru = simulate(trace, costs, host, "lru")
    belady = simulate(trace, costs, host, BELADY)
    mru = simulate(trace, costs, host, MostRecentlyUsed())
    assert belady.loads <= min(lru.loads, mru.loads)
    assert belady.hit_ratio >= max(lru.hit_ratio, mru.hit_ratio)
    assert belady.loads < lru.loads  # and on this trace, strictly fewer


def test_scheduler_settings_move_the_result() -> None:
    """The simulator reads the scheduler's own settings: a keep-alive shorter than the
    gaps between requests unloads idle models (ttl) and every request loads again."""
    trace = [TraceRequest(i * 100.0, "a", 1, 0) for i in range(5)]
    kept = simulate(trace, EQUAL, two_of_three(), "lru")
    short = replace(SETTINGS, keep_alive=30.0)
    expired = simulate(trace, EQUAL, two_of_three(settings=short), "lru")
    assert (kept.loads, kept.hits) == (1, 4)
    assert (expired.loads, expired.hits) == (5, 0)
    young = replace(SETTINGS, min_residency=25.0, load_wait_timeout=5.0)
    guarded = simulate(cyclic(4), EQUAL, two_of_three(settings=young), "lru")
    assert guarded.errors == {"503": guarded.requests - guarded.served}
    assert guarded.served < guarded.requests  # anti-thrash refuses what it cannot place


def test_the_host_tier_turns_reloads_into_cheap_returns() -> None:
    without = simulate(cyclic(10), EQUAL, two_of_three(), "lru")
    tiered = simulate(cyclic(10), EQUAL, two_of_three(host_cache=3 * GB), "lru")
    assert tiered.loads == 3 and tiered.host_loads == 27
    assert tiered.load_seconds < without.load_seconds / 3
    assert tiered.waited_p50_ms is not None and tiered.waited_p50_ms < 1000.0


def test_several_gpus_hold_more() -> None:
    one = simulate(cyclic(10), EQUAL, two_of_three(), "lru")
    two = simulate(cyclic(10), EQUAL, two_of_three(gpus=2), "lru")
    assert (one.hits, two.hits, two.loads) == (0, 27, 3)


def test_a_trace_model_missing_from_the_table_is_refused() -> None:
    with pytest.raises(ValueError, match="no entry for zzz"):
        simulate([TraceRequest(0, "zzz")], EQUAL, two_of_three(), "lru")


def test_a_model_too_large_for_the_gpu_is_answered_503_not_hung() -> None:
    costs = {**EQUAL, "huge": ModelCost(bytes=10 * GB, load_s=1.0)}
    trace = [TraceRequest(0, "huge"), TraceRequest(1, "a")]
    result = simulate(trace, costs, two_of_three(), "lru")
    assert result.errors == {"503": 1} and result.served == 1


def _event(n: int, ts: float, kind: str, model: str, **detail: object) -> Event:
    return Event(
        id=n,
        ts=ts,
        kind=kind,
        model=model,
        version="1",
        device="cuda:0",
        reason=None,
        detail=dict(detail),
        bytes=100,
        duration_ms=500.0,
    )


def test_summarize_counts_thrash_within_its_window_and_tier_moves() -> None:
    events = [
        _event(1, 0.0, "load", "a", source="disk"),
        _event(2, 10.0, "evict", "a", tier="host", host_bytes=100),
        _event(3, 20.0, "load", "a", source="host"),  # 10 s after: thrash
        _event(4, 30.0, "evict", "a", tier="gone"),
        _event(5, 200.0, "load", "a", source="disk"),  # 170 s after: not
        _event(6, 1.0, "load_failed", "b"),
    ]
    outcomes = [Outcome(200, None), Outcome(200, 500.0), Outcome(200, 1500.0), Outcome(503, None)]
    result = summarize("lru", reversed(events), outcomes, thrash_window=60.0)
    assert (result.loads, result.host_loads, result.evictions, result.thrash) == (2, 1, 2, 1)
    assert result.bytes_moved == 300 + 100  # three loads, one offload
    assert result.load_seconds == pytest.approx(1.5)
    assert (result.requests, result.served, result.hits, result.errors) == (4, 3, 1, {"503": 1})
    assert (result.waited, result.waited_p50_ms, result.waited_p95_ms) == (2, 500.0, 1500.0)
    assert result.hit_ratio == 0.25
    table = render([result], reference="lru")
    assert "lru (reference)" in table and "1×503" in table
