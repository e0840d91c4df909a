"""Synthetic traces and the model tables that go with them.

Three shapes of traffic, each seeded and repeatable:

- ``zipf`` — Poisson arrivals at ``rate``; model ``k`` (from 1) is asked for with
  probability ∝ 1/k^α. The classic skew: a few models take most requests.
- ``bursty`` — each model alternates between quiet and busy spells of exponential
  length (a Markov-modulated Poisson process); busy, it is asked ``busy_factor``
  times as often. Popularity is Zipf as above; what changes is when.
- ``shift`` — Zipf, but every ``shift_every`` seconds the ranking is drawn again:
  yesterday's favourite goes cold, and a policy must notice.

Sizes are ``equal`` (every model ``size`` bytes, as cheap to load as the others) or
``mixed``: log-uniform between ``min_size`` and ``max_size`` (0.5–70 GB by default).
A load from disk takes ``load_fixed_s`` plus its bytes at ``disk_gbps`` (with mixed
sizes, times a per-model factor within ``cost_spread``); from the host tier, its
bytes at ``host_gbps``; a completion token, more for larger models.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from routerd.simulate.costs import ModelCost
from routerd.simulate.trace import TraceRequest

KINDS = ("zipf", "bursty", "shift")
SIZES = ("equal", "mixed")
GB = 10**9


@dataclass(frozen=True)
class Workload:
    kind: str = "zipf"
    requests: int = 10_000
    models: int = 20
    rate: float = 2.0  # requests per second, all models together, on average
    alpha: float = 1.0  # Zipf exponent
    sizes: str = "equal"
    size: int = 14 * GB
    min_size: int = GB // 2
    max_size: int = 70 * GB
    disk_gbps: float = 2.0
    host_gbps: float = 20.0
    load_fixed_s: float = 1.0  # what a load costs besides reading (engine start, warm-up)
    # Mixed sizes: each model's load time is also multiplied by a factor drawn
    # log-uniformly within [1/cost_spread, cost_spread] — models on slower storage, or
    # whose engine compiles at start, cost more to load than their bytes say.
    cost_spread: float = 1.0
    busy_factor: float = 20.0
    quiet_s: float = 300.0  # mean quiet spell (bursty)
    busy_s: float = 60.0  # mean busy spell (bursty)
    shift_every: float = 3600.0  # seconds between popularity changes (shift)
    prompt_tokens: tuple[int, int] = (50, 1000)  # drawn uniformly
    completion_tokens: tuple[int, int] = (20, 400)
    seed: int = 0

    def check(self) -> None:
        """``ValueError`` naming the first setting that cannot make a workload."""
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload {self.kind!r} (known: {', '.join(KINDS)})")
        if self.sizes not in SIZES:
            raise ValueError(f"unknown sizes {self.sizes!r} (known: {', '.join(SIZES)})")
        for name in ("requests", "models"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("rate", "disk_gbps", "host_gbps", "busy_factor", "quiet_s", "busy_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0")
        if self.shift_every <= 0:
            raise ValueError("shift_every must be more than 0")
        if self.alpha < 0:
            raise ValueError("alpha must be 0 or more")
        if self.cost_spread < 1:
            raise ValueError("cost_spread must be 1 (none) or more")
        if not 0 < self.min_size <= self.max_size or self.size <= 0:
            raise ValueError("sizes must be more than 0, and min_size at most max_size")


def model_names(count: int) -> list[str]:
    width = len(str(count - 1))
    return [f"model-{i:0{width}d}" for i in range(count)]


def costs_for(workload: Workload) -> dict[str, ModelCost]:
    """The model table: sizes and costs as the module docstring describes."""
    rng = random.Random(f"{workload.seed}-sizes")
    table = {}
    for name in model_names(workload.models):
        factor = 1.0
        if workload.sizes == "equal":
            size = workload.size
        else:
            low, high = math.log(workload.min_size), math.log(workload.max_size)
            size = int(math.exp(rng.uniform(low, high)))
            spread = math.log(workload.cost_spread)
            factor = math.exp(rng.uniform(-spread, spread))
        table[name] = ModelCost(
            bytes=size,
            load_s=round(factor * (workload.load_fixed_s + size / (workload.disk_gbps * GB)), 3),
            host_s=round(size / (workload.host_gbps * GB), 3),
            per_token_s=round(0.005 + 0.0005 * size / GB, 5),
        )
    return table


def generate(workload: Workload) -> list[TraceRequest]:
    """``workload.requests`` requests, in time order."""
    workload.check()
    rng = random.Random(workload.seed)
    names = model_names(workload.models)
    weights = [1 / (k**workload.alpha) for k in range(1, len(names) + 1)]
    if workload.kind == "bursty":
        arrivals: Iterator[tuple[float, str]] = _bursty(workload, names, weights, rng)
    else:
        arrivals = _zipf(workload, names, weights, rng)
    low_p, high_p = workload.prompt_tokens
    low_c, high_c = workload.completion_tokens
    return [
        TraceRequest(round(t, 6), model, rng.randint(low_p, high_p), rng.randint(low_c, high_c))
        for t, model in itertools.islice(arrivals, workload.requests)
    ]


def _zipf(
    workload: Workload, names: Sequence[str], weights: Sequence[float], rng: random.Random
) -> Iterator[tuple[float, str]]:
    """Poisson arrivals; under ``shift`` the ranking is drawn again every period."""
    ranking = list(names)
    cumulative = list(itertools.accumulate(weights))
    period = 0
    t = 0.0
    while True:
        t += rng.expovariate(workload.rate)
        if workload.kind == "shift" and int(t // workload.shift_every) != period:
            period = int(t // workload.shift_every)
            rng.shuffle(ranking)
        yield t, rng.choices(ranking, cum_weights=cumulative)[0]


def _bursty(
    workload: Workload, names: Sequence[str], weights: Sequence[float], rng: random.Random
) -> Iterator[tuple[float, str]]:
    """Each model's own Markov-modulated Poisson arrivals, merged in time order.

    A model's quiet rate is set so that, busy spells included, the models together
    make ``rate`` requests per second on average, shared in Zipf proportions."""
    share = workload.busy_s / (workload.busy_s + workload.quiet_s)
    mean_factor = (1 - share) + share * workload.busy_factor
    total = sum(weights)
    streams = [
        _spells(workload, workload.rate * w / total / mean_factor, random.Random(rng.random()))
        for w in weights
    ]
    yield from heapq.merge(*(_named(s, name) for s, name in zip(streams, names, strict=True)))


def _named(times: Iterator[float], name: str) -> Iterator[tuple[float, str]]:
    for t in times:
        yield t, name


def _spells(workload: Workload, quiet_rate: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    busy = rng.random() < workload.busy_s / (workload.busy_s + workload.quiet_s)
    spell_end = rng.expovariate(1 / (workload.busy_s if busy else workload.quiet_s))
    while True:
        rate = quiet_rate * (workload.busy_factor if busy else 1.0)
        t += rng.expovariate(rate)
        while t >= spell_end:  # the spell ended first: arrivals restart at the new rate
            t = spell_end
            busy = not busy
            spell_end = t + rng.expovariate(1 / (workload.busy_s if busy else workload.quiet_s))
            rate = quiet_rate * (workload.busy_factor if busy else 1.0)
            t += rng.expovariate(rate)
        yield t
