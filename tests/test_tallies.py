"""Lock-free tallies export what prometheus-client's own metrics would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from routerd.tallies import HistogramTally, Tally, TallyCollector

BUCKETS = (0.005, 0.01, 0.1, 1.0, 10.0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus-client's creation timestamps; tallies have none
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_tallies_match_prometheus_client_sample_for_sample():
    theirs = CollectorRegistry()
    counter = Counter("t_requests", "doc", ["model", "status"], registry=theirs)
    histogram = Histogram("t_seconds", "doc", ["model"], buckets=BUCKETS, registry=theirs)
    ours = CollectorRegistry()
    tally = Tally("t_requests", "doc", ["model", "status"])
    histogram_tally = HistogramTally("t_seconds", "doc", ["model"], buckets=BUCKETS)
    ours.register(TallyCollector([tally, histogram_tally]))

    rng = random.Random(7)
    values = [rng.choice(BUCKETS) for _ in range(50)]  # exactly on bounds: "le" counts them
    values += [rng.uniform(0, 20) for _ in range(500)]
    for i, value in enumerate(values):
        model, status = ("a", "b")[i % 2], ("200", "500")[i % 3 == 0]
        counter.labels(model, status).inc(i % 4)
        tally.inc((model, status), i % 4)
        histogram.labels(model).observe(value)
        histogram_tally.observe((model,), value)

    expected = _samples(theirs)
    assert expected, "the reference registry exported samples"
    got = _samples(ours)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_a_tally_refuses_to_go_down():
    tally = Tally("t", "doc", ["x"])
    with pytest.raises(ValueError):
        tally.inc(("a",), -1)
    assert tally.values == {}
