"""Routing policies rank replicas: resident first, then by their own rule."""

from __future__ import annotations

import random

from policies.routing import Candidate, LeastOutstanding, PowerOfTwo, RoundRobin, RouteRequest

REQUEST = RouteRequest("m@1")


def cand(key, load=0, resident=True):
    return Candidate(key=key, device="cpu", resident=resident, in_flight=load, queued=0)


def test_least_outstanding_prefers_resident_then_least_loaded():
    ranked = LeastOutstanding().rank(
        REQUEST, [cand("a", 5), cand("b", 1), cand("c", 0, resident=False), cand("d", 1)]
    )
    assert [c.key for c in ranked] == ["b", "d", "a", "c"]


def test_round_robin_rotates_per_model():
    policy = RoundRobin()
    candidates = [cand("a"), cand("b"), cand("c", resident=False)]
    firsts = [policy.rank(REQUEST, candidates)[0].key for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    assert policy.rank(RouteRequest("other@1"), candidates)[0].key == "a"
    assert policy.rank(REQUEST, candidates)[-1].key == "c"


def test_power_of_two_never_prefers_the_worse_of_its_pair():
    policy = PowerOfTwo(random.Random(7))
    candidates = [cand("a", 9), cand("b", 0), cand("c", 4), cand("d", 2, resident=False)]
    for _ in range(50):
        ranked = policy.rank(REQUEST, candidates)
        assert ranked[0].load <= ranked[1].load
        assert ranked[0].key != "a"  # the most loaded resident never wins a pair
        assert ranked[-1].key == "d"
