"""Prometheus counters and histograms for the event loop: plain sums, no locks.

prometheus-client's metrics take a lock on every increment and walk their buckets in
Python, so the five observations each request makes (count, duration, tokens, batch)
cost more than a third of routerd's own work per request on the echo benchmark. The
request path runs on the event loop only, so these tallies keep plain dicts and are
turned into metric families when ``/metrics`` is scraped, on the same loop.

Use them only for values updated from the event loop; events that can come from other
threads (loads, evictions) keep prometheus-client's own metrics.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

Labels = tuple[str, ...]


class Tally:
    """A labelled counter (exported as ``<name>_total``)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        values = self.values
        values[labels] = values.get(labels, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        return family


class HistogramTally:
    """A labelled histogram with fixed upper bounds (``le``), plus ``+Inf``."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        # per label set: one count per bound, one for +Inf, then the sum
        self.series: dict[Labels, list[float]] = {}

    def observe(self, labels: Labels, value: float) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1  # first bound >= value: "le"
        series[-1] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in self.series.items():
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*self.bounds, math.inf), series[:-1], strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(labels), buckets, sum_value=series[-1])
        return family


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class TallyCollector(Collector):
    """Exports a set of tallies from a registry (collected at scrape time)."""

    def __init__(self, tallies: Sequence[Tally | HistogramTally]) -> None:
        self._tallies = tuple(tallies)

    def describe(self) -> list[Metric]:
        return [t.family() for t in self._tallies]

    def collect(self) -> Iterator[Metric]:
        for tally in self._tallies:
            yield tally.family()
