"""Microseconds per routing decision with 100 models × 10 versions.

One decision is what every request pays before it reaches an instance: resolve the
model id through the router's table (a mix of ``name`` and ``name@version``) and
rank the version's replicas with the default routing policy. Measured side by side
with a bare dict lookup in the same run, because these machines are shared.

Usage: python bench/routing_decision.py [--decisions 200000]
Ends with one JSON line: us_per_decision (goal ≤ 10), baseline_us_per_lookup, ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies.registry import create
from policies.routing import Candidate, RouteRequest
from routerd.router import Router
from state import VersionRecord


def build(models: int, versions: int) -> tuple[Router, list[str], dict[str, list[Candidate]]]:
    records = [
        VersionRecord(
            name=f"model-{m}",
            version=str(v),
            backend="transformers",
            path=f"/models/{m}/{v}",
            options={},
            source="api",
            created_at=float(v),
            updated_at=float(v),
        )
        for m in range(models)
        for v in range(versions)
    ]
    rng = random.Random(1)
    replicas = {
        r.model_id: [
            Candidate(f"{r.model_id}#{i}", "cpu", True, rng.randrange(8), rng.randrange(4))
            for i in range(rng.randint(1, 4))
        ]
        for r in records
    }
    ids = [f"model-{rng.randrange(models)}" for _ in range(1000)]
    ids += [f"model-{rng.randrange(models)}@{rng.randrange(versions)}" for _ in range(1000)]
    rng.shuffle(ids)
    return Router(records), ids, replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    router, ids, replicas = build(100, 10)
    policy = create("routing", "least-outstanding")
    n = args.decisions

    started = time.perf_counter()
    for i in range(n):
        record = router.resolve(ids[i % len(ids)])
        policy.rank(RouteRequest(record.model_id), replicas[record.model_id])
    decision_s = (time.perf_counter() - started) / n

    table = router.table.versions
    keys = [next(iter(table))] * len(ids)
    started = time.perf_counter()
    for i in range(n):
        table.get(keys[i % len(keys)])
    baseline_s = (time.perf_counter() - started) / n

    us, base = decision_s * 1e6, baseline_s * 1e6
    print(f"{n} decisions over 1000 versions: {us:.2f} µs each (dict lookup {base:.3f} µs)")
    print(
        json.dumps(
            {
                "us_per_decision": round(us, 3),
                "baseline_us_per_lookup": round(base, 4),
                "ratio_to_baseline": round(us / base, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
