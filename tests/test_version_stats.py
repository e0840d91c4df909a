"""Per-version rolling windows (routerd.version_stats)."""

from __future__ import annotations

from routerd.version_stats import SHADOW, VersionStats, percentile
from tests.support import FakeClock


def test_window_counts_errors_and_p95_since_a_time() -> None:
    clock = FakeClock()
    stats = VersionStats(clock)
    for i in range(10):
        stats.record("m@1", latency_ms=float(i), ok=i != 3)
    clock.advance(10)
    since = clock()
    for i in range(100):
        stats.record("m@1", latency_ms=float(i + 1), ok=i % 10 != 0)
    window = stats.window("m@1", since=since)
    assert (window.requests, window.errors) == (100, 10)
    assert window.p95_ms == 95.0
    assert stats.window("m@1", since=0).requests == 110
    assert stats.window("m@2", since=0).requests == 0


def test_shadow_traffic_is_kept_apart() -> None:
    stats = VersionStats(FakeClock())
    stats.record("m@3", latency_ms=5.0, ok=False, kind=SHADOW)
    assert stats.window("m@3", since=0).requests == 0
    assert stats.window("m@3", since=0, kind=SHADOW).errors == 1
    [entry] = stats.snapshot()
    assert entry["model"] == "m@3"
    assert entry["shadow"]["errors"] == 1 and "primary" not in entry


def test_old_samples_leave_the_window_but_totals_stay() -> None:
    clock = FakeClock()
    stats = VersionStats(clock, window_s=60)
    stats.record("m@1", latency_ms=1.0, ok=False)
    clock.advance(120)
    stats.record("m@1", latency_ms=2.0, ok=True)
    assert stats.recent("m@1").requests == 1
    [entry] = stats.snapshot()
    assert (entry["primary"]["requests"], entry["primary"]["errors"]) == (2, 1)
    assert entry["primary"]["window_requests"] == 1


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.95) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([float(i) for i in range(1, 21)], 0.95) == 19.0


def test_the_window_widens_for_long_rollout_steps() -> None:
    clock = FakeClock()
    stats = VersionStats(clock, window_s=60)
    stats.keep_at_least(3600)
    stats.keep_at_least(10)
    stats.record("m@1", latency_ms=1.0, ok=True)
    clock.advance(1800)
    stats.record("m@1", latency_ms=1.0, ok=True)
    assert stats.window_s == 3600
    assert stats.window("m@1", since=0).requests == 2
