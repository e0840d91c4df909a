"""The pure rollout decision (policies.rollout.decide) and plan validation."""

from __future__ import annotations

import pytest

from policies.rollout import (
    Advance,
    Hold,
    Observation,
    Promote,
    Rollback,
    RolloutPlan,
    WindowStats,
    decide,
)

PLAN = RolloutPlan(
    steps=(5, 25, 50, 100), interval_s=60, max_error_rate=0.01, max_p95_ratio=1.5, min_requests=20
)
HEALTHY = WindowStats(requests=100, errors=0, p95_ms=40.0)
BASELINE = WindowStats(requests=500, errors=1, p95_ms=40.0)


def seen(step: int = 0, elapsed: float = 61, candidate: WindowStats = HEALTHY) -> Observation:
    return Observation(step=step, elapsed_s=elapsed, candidate=candidate, baseline=BASELINE)


def test_healthy_after_the_interval_advances_to_the_next_step() -> None:
    decision = decide(PLAN, seen(step=1))
    assert isinstance(decision, Advance)
    assert (decision.step, decision.weight) == (2, 50)


def test_healthy_at_the_last_step_promotes() -> None:
    assert isinstance(decide(PLAN, seen(step=3)), Promote)


def test_holds_until_the_interval_has_passed() -> None:
    decision = decide(PLAN, seen(elapsed=30))
    assert isinstance(decision, Hold)
    assert "30s more" in decision.reason


def test_holds_without_enough_traffic_to_judge() -> None:
    decision = decide(PLAN, seen(candidate=WindowStats(5, 0, 10.0)))
    assert isinstance(decision, Hold)
    assert "5 of 20" in decision.reason


def test_error_rate_above_the_limit_rolls_back_even_mid_step() -> None:
    decision = decide(PLAN, seen(elapsed=1, candidate=WindowStats(50, 2, 40.0)))
    assert isinstance(decision, Rollback)
    assert "4.0%" in decision.reason and "1.0%" in decision.reason


def test_error_rate_at_the_limit_is_allowed() -> None:
    assert isinstance(decide(PLAN, seen(candidate=WindowStats(100, 1, 40.0))), Advance)


def test_too_few_requests_never_roll_back_on_errors() -> None:
    assert isinstance(decide(PLAN, seen(candidate=WindowStats(3, 3, 40.0))), Hold)


def test_p95_above_the_ratio_rolls_back() -> None:
    decision = decide(PLAN, seen(candidate=WindowStats(100, 0, 61.0)))
    assert isinstance(decision, Rollback)
    assert "p95" in decision.reason


def test_small_latency_gaps_never_count() -> None:
    fast = Observation(0, 61, WindowStats(100, 0, 0.9), WindowStats(100, 0, 0.3))
    assert isinstance(decide(PLAN, fast), Advance)  # 3x, but only 0.6 ms apart


def test_latency_is_not_compared_without_enough_baseline_requests() -> None:
    thin = Observation(0, 61, WindowStats(100, 0, 500.0), WindowStats(3, 0, 10.0))
    assert isinstance(decide(PLAN, thin), Advance)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": ()}, "non-empty"),
        ({"steps": (50, 25, 100)}, "rise strictly"),
        ({"steps": (5, 50)}, "last step must be 100"),
        ({"steps": (0, 100)}, "above 0"),
        ({"max_error_rate": 2.0}, "max_error_rate"),
        ({"max_p95_ratio": 0.5}, "max_p95_ratio"),
        ({"interval_s": -1}, "interval"),
        ({"min_requests": 0}, "min_requests"),
    ],
)
def test_bad_plans_are_refused(changes: dict[str, object], message: str) -> None:
    fields = {**PLAN.to_dict(), "steps": PLAN.steps, **changes}
    fields["interval_s"] = fields.pop("interval_s")
    with pytest.raises(ValueError, match=message):
        RolloutPlan(**fields)  # type: ignore[arg-type]


def test_plan_round_trips_through_its_dict() -> None:
    assert RolloutPlan.from_dict(PLAN.to_dict()) == PLAN
