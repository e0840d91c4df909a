"""Cost of one routing decision, against a bare dict lookup, side by side in one run.

The registry holds 100 models × 10 versions (1000 ``VersionRecord``s) behind a
``routerd.router.Router``; each version has 1–4 replicas (instances) with varied
loads, some still loading. One *decision* is what a request costs before its lease:

1. resolve the request's model id — a mix of ``name`` (→ newest version) and
   ``name@version`` — with ``Router.resolve``;
2. build a ``Candidate`` per replica of that version from its live counters, as
   the scheduler does;
3. rank them with the routing policy (default ``least-outstanding``) and take the
   first.

The baseline does the least any router must: one dict lookup of the same model ids,
in the same loop. Both run over the same precomputed sequence of ids; each is timed
with ``time.perf_counter`` over ``--decisions`` iterations, ``--rounds`` times
alternately, keeping the best round of each. Also reported: the resolve step alone
and the rank step alone (candidates prebuilt; the rest of a decision is building the frozen
``Candidate``s and the ``RouteRequest``), and every built-in policy.

Usage: python bench/routing_decision.py [--decisions 200000] [--rounds 5]
       [--policy least-outstanding]

Prints a human summary, then as its LAST line one JSON object: ``us_per_decision``,
``baseline_us_per_lookup``, ``ratio`` and the breakdown. Goal: us_per_decision ≤ 10.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies import registry
from policies.routing import Candidate, RouteRequest, RoutingPolicy
from routerd.router import Router
from state import VersionRecord

MODELS = 100
VERSIONS = 10
SEED = 20261128
GOAL_US = 10.0


@dataclass
class FakeInstance:
    """What the scheduler reads off an instance to build a candidate."""

    key: str
    device: str
    ready: bool
    in_flight: int
    queued: int


def build_world(rng: random.Random) -> tuple[list[VersionRecord], dict[str, list[FakeInstance]]]:
    records: list[VersionRecord] = []
    replicas: dict[str, list[FakeInstance]] = {}
    for m in range(MODELS):
        for v in range(VERSIONS):
            record = VersionRecord(
                name=f"model-{m:03d}",
                version=f"v{v}",
                backend="echo",
                path=f"/models/model-{m:03d}/v{v}",
                options={},
                source="config",
                created_at=1_000_000.0 + v,
                updated_at=1_000_000.0 + v,
            )
            records.append(record)
            replicas[record.model_id] = [
                FakeInstance(
                    key=f"{record.model_id}#{i}",
                    device=f"cuda:{i % 8}",
                    ready=rng.random() < 0.85,
                    in_flight=rng.randrange(8),
                    queued=rng.randrange(4),
                )
                for i in range(rng.randint(1, 4))
            ]
    return records, replicas


def request_ids(rng: random.Random, n: int) -> list[str]:
    """Half bare names (routed to the newest version), half pinned ``name@version``."""
    ids = []
    for _ in range(n):
        name = f"model-{rng.randrange(MODELS):03d}"
        ids.append(name if rng.random() < 0.5 else f"{name}@v{rng.randrange(VERSIONS)}")
    return ids


def time_decisions(
    ids: Sequence[str],
    router: Router,
    replicas: dict[str, list[FakeInstance]],
    policy: RoutingPolicy,
) -> float:
    resolve = router.resolve
    rank = policy.rank
    start = time.perf_counter()
    for model_id in ids:
        record = resolve(model_id)
        version = record.model_id
        chosen = rank(
            RouteRequest(version),
            [Candidate(i.key, i.device, i.ready, i.in_flight, i.queued) for i in replicas[version]],
        )[0]
    elapsed = time.perf_counter() - start
    assert chosen.key.startswith(version)
    return elapsed


def time_resolve(ids: Sequence[str], router: Router) -> float:
    resolve = router.resolve
    start = time.perf_counter()
    for model_id in ids:
        resolve(model_id)
    return time.perf_counter() - start


def time_rank(
    ids: Sequence[str],
    router: Router,
    replicas: dict[str, list[FakeInstance]],
    policy: RoutingPolicy,
) -> float:
    """The rank step alone, over the same versions with candidates built beforehand."""
    built = {
        version: [Candidate(i.key, i.device, i.ready, i.in_flight, i.queued) for i in instances]
        for version, instances in replicas.items()
    }
    work = [(RouteRequest(v), built[v]) for v in (router.resolve(m).model_id for m in ids)]
    rank = policy.rank
    start = time.perf_counter()
    for request, candidates in work:
        rank(request, candidates)
    return time.perf_counter() - start


def time_baseline(ids: Sequence[str], table: dict[str, VersionRecord]) -> float:
    get = table.get
    start = time.perf_counter()
    for model_id in ids:
        record = get(model_id)
    elapsed = time.perf_counter() - start
    assert record is not None
    return elapsed


def best(rounds: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(rounds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--policy", default="least-outstanding", choices=registry.known("routing"))
    args = parser.parse_args(argv)
    rng = random.Random(SEED)
    records, replicas = build_world(rng)
    router = Router(records)
    ids = request_ids(rng, args.decisions)
    # The baseline's table answers both id forms, as a router without routes would.
    table = dict(router.table.versions)
    table.update(router.table.latest)

    n = args.decisions
    us = 1e6 / n
    decision = baseline = float("inf")
    warm_up = ids[: max(n // 10, 1)]
    time_decisions(warm_up, router, replicas, registry.create("routing", args.policy))
    time_baseline(warm_up, table)
    for _ in range(args.rounds):  # alternate, so drift hits both alike
        policy = registry.create("routing", args.policy)
        decision = min(decision, time_decisions(ids, router, replicas, policy) * us)
        baseline = min(baseline, time_baseline(ids, table) * us)
    resolve_us = best(args.rounds, lambda: time_resolve(ids, router)) * us
    rank_us = (
        best(
            args.rounds,
            lambda: time_rank(ids, router, replicas, registry.create("routing", args.policy)),
        )
        * us
    )
    per_policy: dict[str, float] = {}
    for name in registry.known("routing"):
        per_policy[name] = min(
            time_decisions(ids, router, replicas, registry.create("routing", name))
            for _ in range(args.rounds)
        )
        per_policy[name] *= us
    mean_replicas = sum(len(r) for r in replicas.values()) / len(replicas)

    print(
        f"routing decision ({args.policy}, {MODELS}×{VERSIONS} versions, "
        f"{mean_replicas:.1f} replicas on average, {n} decisions, best of {args.rounds}): "
        f"{decision:.2f} µs  [resolve {resolve_us:.2f} µs, rank {rank_us:.2f} µs, the rest "
        f"~{decision - resolve_us - rank_us:.2f} µs building candidates]  vs  "
        f"bare dict lookup {baseline:.3f} µs  ({decision / baseline:.0f}×); "
        f"goal ≤ {GOAL_US:g} µs: {'met' if decision <= GOAL_US else 'MISSED'}"
    )
    print(
        "per policy: "
        + ", ".join(f"{name} {value:.2f} µs" for name, value in per_policy.items())
        + f"  (Python {platform.python_version()}, {platform.machine()})"
    )
    print(
        json.dumps(
            {
                "us_per_decision": round(decision, 3),
                "baseline_us_per_lookup": round(baseline, 4),
                "ratio": round(decision / baseline, 1),
                "resolve_us": round(resolve_us, 3),
                "rank_us": round(rank_us, 3),
                "build_us": round(decision - resolve_us - rank_us, 3),
                "per_policy_us": {k: round(v, 3) for k, v in per_policy.items()},
                "policy": args.policy,
                "decisions": n,
                "versions": len(records),
                "goal_us": GOAL_US,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
