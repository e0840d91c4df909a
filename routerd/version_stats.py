"""Per-version request counts, errors and latencies over a rolling window, in process.

The rollout controller judges a canary on these (error rate and p95 since the step
began), and ``routerctl status`` shows them. They are kept apart from the Prometheus
metrics (``routerd.metrics``) because a rollout needs windows it can query by time,
per version, right now, which a scrape-oriented counter does not give.

Primary and shadow traffic are kept separately: shadow answers are discarded, and
their failures must not count against the version that served the client.

Memory is bounded: samples older than ``window_s`` are dropped as new ones arrive,
and each version keeps at most ``max_samples`` of them. Everything runs on the event
loop; no lock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from policies.rollout import WindowStats

PRIMARY = "primary"
SHADOW = "shadow"


@dataclass
class _Series:
    samples: deque[tuple[float, float, bool]]  # (time, latency ms, ok)
    requests: int = 0  # since start, never dropped
    errors: int = 0


class VersionStats:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        *,
        window_s: float = 900.0,
        max_samples: int = 50_000,
    ) -> None:
        self._clock = clock
        self.window_s = window_s
        self._max_samples = max_samples
        self._series: dict[tuple[str, str], _Series] = {}

    def record(self, model_id: str, *, latency_ms: float, ok: bool, kind: str = PRIMARY) -> None:
        """One finished request of ``model_id`` (``kind``: primary or shadow)."""
        series = self._series.get((model_id, kind))
        if series is None:
            series = _Series(deque(maxlen=self._max_samples))
            self._series[(model_id, kind)] = series
        now = self._clock()
        series.samples.append((now, latency_ms, ok))
        series.requests += 1
        series.errors += not ok
        horizon = now - self.window_s
        while series.samples and series.samples[0][0] < horizon:
            series.samples.popleft()

    def keep_at_least(self, seconds: float) -> None:
        """Widen the window so that a step of ``seconds`` (a rollout's interval) fits in it."""
        self.window_s = max(self.window_s, seconds)

    def window(self, model_id: str, *, since: float, kind: str = PRIMARY) -> WindowStats:
        """Requests of ``model_id`` finished at or after ``since`` (the stats' clock)."""
        series = self._series.get((model_id, kind))
        if series is None:
            return WindowStats(requests=0, errors=0, p95_ms=None)
        latencies = [lat for ts, lat, _ in series.samples if ts >= since]
        errors = sum(1 for ts, _, ok in series.samples if ts >= since and not ok)
        return WindowStats(
            requests=len(latencies), errors=errors, p95_ms=percentile(latencies, 0.95)
        )

    def recent(self, model_id: str, *, kind: str = PRIMARY) -> WindowStats:
        """The whole retained window."""
        return self.window(model_id, since=self._clock() - self.window_s, kind=kind)

    def now(self) -> float:
        return self._clock()

    def snapshot(self) -> list[dict[str, Any]]:
        """Every version seen: totals since start and the last window, for status pages."""
        out: dict[str, dict[str, Any]] = {}
        for (model_id, kind), series in sorted(self._series.items()):
            recent = self.recent(model_id, kind=kind)
            entry = out.setdefault(model_id, {"model": model_id})
            entry[kind] = {
                "requests": series.requests,
                "errors": series.errors,
                "window_s": self.window_s,
                "window_requests": recent.requests,
                "window_error_rate": round(recent.error_rate, 6),
                "window_p50_ms": _round(percentile([lat for _, lat, _ in series.samples], 0.5)),
                "window_p95_ms": _round(recent.p95_ms),
            }
        return list(out.values())


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
