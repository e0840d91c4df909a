"""Batching policies are pure: queue and running batch in, a number of rows out."""

from __future__ import annotations

import pytest

from policies.batching import DynamicBatching, NoBatching, Queued


def q(*tokens, waited=0.0):
    return [Queued(tokens=t, waited_s=waited) for t in tokens]


def test_none_runs_one_at_a_time():
    policy = NoBatching()
    assert policy.admit(q(10, 10), running=[]) == 1
    assert policy.admit(q(10), running=[10]) == 0
    assert policy.admit([], running=[]) == 0


def test_dynamic_waits_for_more_until_max_wait():
    policy = DynamicBatching(max_batch_size=4, max_wait_ms=10)
    assert policy.admit(q(10, 10), running=[]) == 0
    assert policy.wait_s(q(10, waited=0.004)) == pytest.approx(0.006)
    assert policy.admit(q(10, 10, waited=0.010), running=[]) == 2


def test_dynamic_starts_at_once_when_a_full_batch_is_queued():
    policy = DynamicBatching(max_batch_size=3, max_wait_ms=1000)
    assert policy.admit(q(1, 1, 1, 1, 1), running=[]) == 3


def test_dynamic_joins_a_running_batch_up_to_its_limits():
    policy = DynamicBatching(max_batch_size=4, max_wait_ms=1000, max_batch_tokens=100)
    assert policy.admit(q(10, 10, 10), running=[10, 10]) == 2
    assert policy.admit(q(10), running=[10, 10, 10, 10]) == 0
    assert policy.admit(q(50, 20), running=[40]) == 1  # 40 + 50 fits, + 20 more would not


def test_token_budget_never_blocks_a_lone_request():
    policy = DynamicBatching(max_batch_size=4, max_wait_ms=0, max_batch_tokens=100)
    assert policy.admit(q(500, 10), running=[]) == 1


@pytest.mark.parametrize(
    "bad", [{"max_batch_size": 0}, {"max_wait_ms": -1}, {"max_batch_tokens": 0}]
)
def test_dynamic_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        DynamicBatching(**bad)
