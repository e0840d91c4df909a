"""Rollout decisions: given a canary's plan and what was observed, what to do next.

Pure (DESIGN.md rule 2): ``decide`` takes the plan and an observation of live
per-version metrics and returns one decision. The rollout controller
(``routerd.rollout``) gathers the observation, applies the decision and records it;
this module does no I/O, keeps no state and reads no clock, so every path is a
one-line unit test.

Rules, in order:

1. Enough candidate requests (``min_requests``) and an error rate above
   ``max_error_rate`` → roll back, at any time during a step.
2. Enough requests on both versions and a candidate p95 above ``max_p95_ratio`` ×
   the baseline's p95 → roll back. Gaps under ``latency_floor_ms`` never count: at
   that scale timer noise, not the model, decides the ratio.
3. The step has not lasted ``interval_s`` yet → hold.
4. Too few candidate requests to judge → hold (no evidence is not good evidence).
5. Otherwise → advance to the next step, or promote after the last one.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RolloutPlan:
    steps: tuple[int, ...]  # candidate weight (percent) at each step, rising, ending at 100
    interval_s: float  # how long each step lasts at least
    max_error_rate: float  # 0..1
    max_p95_ratio: float  # candidate p95 / baseline p95
    min_requests: int = 20  # candidate requests needed before judging a step
    latency_floor_ms: float = 5.0

    def __post_init__(self) -> None:
        steps = self.steps
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) for s in steps):
            raise ValueError("steps must be a non-empty list of integer percentages")
        if any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps must be percentages above 0 and at most 100, got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must rise strictly, got {list(steps)}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100, got {steps[-1]}")
        _check_number("interval", self.interval_s, low=0.0)
        _check_number("max_error_rate", self.max_error_rate, low=0.0, high=1.0)
        _check_number("max_p95_ratio", self.max_p95_ratio, low=1.0)
        _check_number("latency_floor_ms", self.latency_floor_ms, low=0.0)
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int):
            raise ValueError(f"min_requests must be an integer, got {self.min_requests!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, got {self.min_requests}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": list(self.steps),
            "interval_s": self.interval_s,
            "max_error_rate": self.max_error_rate,
            "max_p95_ratio": self.max_p95_ratio,
            "min_requests": self.min_requests,
            "latency_floor_ms": self.latency_floor_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutPlan:
        steps = data.get("steps")
        if not isinstance(steps, list | tuple):
            raise ValueError("steps must be a list of integer percentages")
        return cls(
            steps=tuple(steps),
            interval_s=data.get("interval_s", 60.0),
            max_error_rate=data.get("max_error_rate", 0.01),
            max_p95_ratio=data.get("max_p95_ratio", 1.5),
            min_requests=data.get("min_requests", 20),
            latency_floor_ms=data.get("latency_floor_ms", 5.0),
        )


def _check_number(name: str, value: object, *, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bounds = f"at least {low:g}" if math.isinf(high) else f"from {low:g} to {high:g}"
        raise ValueError(f"{name} must be {bounds}, got {value:g}")


def _finite(value: float) -> bool:
    """Finite, and a float: an int past a double's range (JSON allows any length) is
    not, and ``math.isfinite`` would raise OverflowError on it."""
    if isinstance(value, int):
        return -sys.float_info.max <= value <= sys.float_info.max
    return math.isfinite(value)


@dataclass(frozen=True)
class WindowStats:
    """A version's requests over the window the controller looked at."""

    requests: int
    errors: int
    p95_ms: float | None  # None without requests

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Observation:
    step: int  # index into plan.steps
    elapsed_s: float  # since the step began
    candidate: WindowStats
    baseline: WindowStats


@dataclass(frozen=True)
class _Because:
    """A decision that carries nothing but why it was made."""

    reason: str


class Hold(_Because):
    """Stay at the current step."""


@dataclass(frozen=True)
class Advance:
    step: int  # the next index into plan.steps
    weight: int  # the candidate's weight there
    reason: str


class Promote(_Because):
    """Give the candidate all the traffic and end the rollout."""


class Rollback(_Because):
    """Give the current version all the traffic back and end the rollout."""


Decision = Hold | Advance | Promote | Rollback


def decide(plan: RolloutPlan, seen: Observation) -> Decision:
    """The next move of a running rollout (see the module docstring for the rules)."""
    candidate, baseline = seen.candidate, seen.baseline
    judged = candidate.requests >= plan.min_requests
    if judged and candidate.error_rate > plan.max_error_rate:
        return Rollback(
            f"error rate {candidate.error_rate:.1%} ({candidate.errors} of "
            f"{candidate.requests} requests) is above the {plan.max_error_rate:.1%} allowed"
        )
    if (
        judged
        and baseline.requests >= plan.min_requests
        and candidate.p95_ms is not None
        and baseline.p95_ms is not None
        and candidate.p95_ms - baseline.p95_ms >= plan.latency_floor_ms
        and candidate.p95_ms > plan.max_p95_ratio * baseline.p95_ms
    ):
        return Rollback(
            f"p95 latency {candidate.p95_ms:.1f} ms is above {plan.max_p95_ratio:g} x the "
            f"current version's {baseline.p95_ms:.1f} ms"
        )
    if seen.elapsed_s < plan.interval_s:
        return Hold(f"step {seen.step + 1} runs {plan.interval_s - seen.elapsed_s:.0f}s more")
    if not judged:
        return Hold(
            f"waiting for traffic: {candidate.requests} of {plan.min_requests} requests "
            "needed to judge this step"
        )
    health = f"{candidate.requests} requests, error rate {candidate.error_rate:.1%}" + (
        f", p95 {candidate.p95_ms:.1f} ms" if candidate.p95_ms is not None else ""
    )
    if seen.step + 1 >= len(plan.steps):
        return Promote(f"healthy at 100%: {health}")
    nxt = seen.step + 1
    return Advance(nxt, plan.steps[nxt], f"healthy at {plan.steps[seen.step]}%: {health}")
