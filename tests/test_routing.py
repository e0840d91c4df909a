"""Routing policies rank replicas: resident first, then by their own rule."""

from __future__ import annotations

import random

import pytest

from policies.routing import (
    ROUTING_POLICIES,
    Candidate,
    LeastOutstanding,
    PowerOfTwo,
    RoundRobin,
    RouteRequest,
)

REQUEST = RouteRequest("m@1")


def cand(key, load=0, resident=True, queued=0):
    return Candidate(key=key, device="cpu", resident=resident, in_flight=load, queued=queued)


def keys(ranked):
    return [c.key for c in ranked]


def make(name):
    return PowerOfTwo(random.Random(1)) if name == "power-of-two" else ROUTING_POLICIES[name]()


def test_the_table_names_each_policy_by_its_own_name():
    assert sorted(ROUTING_POLICIES) == ["least-outstanding", "power-of-two", "round-robin"]
    for name, factory in ROUTING_POLICIES.items():
        assert factory().name == name


@pytest.mark.parametrize("name", sorted(ROUTING_POLICIES))
def test_every_policy_ranks_each_candidate_once_resident_first(name):
    policy = make(name)
    rng = random.Random(42)
    for _ in range(300):
        candidates = tuple(
            cand(f"m@1#{i}", rng.randrange(5), rng.random() < 0.7, rng.randrange(3))
            for i in range(rng.randrange(0, 6))
        )
        ranked = policy.rank(REQUEST, candidates)
        assert sorted(keys(ranked)) == sorted(keys(candidates))
        residency = [c.resident for c in ranked]
        assert residency == sorted(residency, reverse=True), keys(ranked)


@pytest.mark.parametrize("name", sorted(ROUTING_POLICIES))
def test_no_candidate_or_one(name):
    policy = make(name)
    assert policy.rank(REQUEST, []) == []
    only = cand("a", 3, resident=False)
    assert policy.rank(REQUEST, [only]) == [only]


def test_least_outstanding_prefers_resident_then_least_loaded():
    ranked = LeastOutstanding().rank(
        REQUEST, [cand("a", 5), cand("b", 1), cand("c", 0, resident=False), cand("d", 1)]
    )
    assert keys(ranked) == ["b", "d", "a", "c"]


def test_least_outstanding_counts_queued_requests_and_breaks_ties_by_key():
    policy = LeastOutstanding()
    ranked = policy.rank(REQUEST, [cand("z", 1), cand("a", 0, queued=2), cand("m", 0, queued=1)])
    assert keys(ranked) == ["m", "z", "a"]  # loads 1, 1, 2: the tie goes to the smaller key
    cold = [cand("y", 0, resident=False), cand("x", 2, resident=False), cand("w", 9)]
    assert keys(policy.rank(REQUEST, cold)) == ["w", "y", "x"]


def test_round_robin_rotates_per_model():
    policy = RoundRobin()
    candidates = [cand("a"), cand("b"), cand("c", resident=False)]
    firsts = [policy.rank(REQUEST, candidates)[0].key for _ in range(4)]
    assert firsts == ["a", "b", "a", "b"]
    assert policy.rank(RouteRequest("other@1"), candidates)[0].key == "a"
    assert policy.rank(REQUEST, candidates)[-1].key == "c"


def test_round_robin_takes_full_turns_whatever_the_load_and_order():
    policy = RoundRobin()
    candidates = [cand("c", 9), cand("a", 0), cand("b", 4)]
    rankings = [keys(policy.rank(REQUEST, candidates)) for _ in range(4)]
    assert rankings == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_round_robin_turns_of_two_models_do_not_interfere():
    policy = RoundRobin()
    candidates = [cand("a"), cand("b"), cand("c")]
    seen = {"m@1": [], "n@2": []}
    for model in ["m@1", "n@2", "n@2", "m@1", "n@2", "m@1"]:
        seen[model].append(policy.rank(RouteRequest(model), candidates)[0].key)
    assert seen == {"m@1": ["a", "b", "c"], "n@2": ["a", "b", "c"]}


def test_round_robin_keeps_going_when_a_replica_becomes_ready():
    policy = RoundRobin()
    loading = [cand("a"), cand("b"), cand("c", resident=False)]
    assert [policy.rank(REQUEST, loading)[0].key for _ in range(3)] == ["a", "b", "a"]
    ready = [cand("a"), cand("b"), cand("c")]
    assert [policy.rank(REQUEST, ready)[0].key for _ in range(3)] == ["b", "c", "a"]


def test_round_robin_with_no_resident_replica_ranks_the_cold_ones_by_key():
    policy = RoundRobin()
    cold = [cand("b", resident=False), cand("a", resident=False)]
    assert keys(policy.rank(REQUEST, cold)) == ["a", "b"]
    assert keys(policy.rank(REQUEST, cold)) == ["a", "b"]


def test_power_of_two_never_prefers_the_worse_of_its_pair():
    policy = PowerOfTwo(random.Random(7))
    candidates = [cand("a", 9), cand("b", 0), cand("c", 4), cand("d", 2, resident=False)]
    firsts = set()
    for _ in range(200):
        ranked = policy.rank(REQUEST, candidates)
        assert ranked[0].load <= ranked[1].load
        assert ranked[0].key != "a"  # the most loaded resident never wins a pair
        assert ranked[-1].key == "d"
        firsts.add(ranked[0].key)
    assert firsts == {"b", "c"}  # c wins the pair (a, c): the draw is random, not a sort


def test_power_of_two_is_repeatable_with_a_seeded_generator():
    candidates = [cand(k, load) for k, load in zip("abcdef", [5, 3, 8, 1, 1, 6], strict=True)]
    first = PowerOfTwo(random.Random(3))
    second = PowerOfTwo(random.Random(3))
    for _ in range(50):
        assert first.rank(REQUEST, candidates) == second.rank(REQUEST, candidates)


def test_power_of_two_draws_two_distinct_candidates_uniformly():
    policy = PowerOfTwo(random.Random(11))
    candidates = [cand(k) for k in "abcd"]  # equal loads: the draw's order stands
    pairs: dict[tuple[str, str], int] = {}
    for _ in range(6000):
        ranked = policy.rank(REQUEST, candidates)
        pair = (ranked[0].key, ranked[1].key)
        assert pair[0] != pair[1]
        pairs[pair] = pairs.get(pair, 0) + 1
    assert len(pairs) == 12
    assert min(pairs.values()) > 6000 / 12 * 0.7


def test_power_of_two_with_one_resident_replica_draws_nothing():
    class Exploding(random.Random):
        def random(self):
            raise AssertionError("no draw expected")

    policy = PowerOfTwo(Exploding())
    ranked = policy.rank(REQUEST, [cand("b", 5, resident=False), cand("a", 9)])
    assert keys(ranked) == ["a", "b"]
