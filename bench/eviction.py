"""Eviction policies against each other and against Belady's rule, on the simulator.

Every policy (``lru``, ``lfu``, ``gdsf``, ``cost``) and Belady's rule replay the same
traces through the daemon's scheduler on virtual time (``routerd.simulate``; min
residency 0, keep-alive never, requests far enough apart that eviction, not
queueing behind loads, decides):

a. ``zipf_equal``: Zipf α=1 over 100 models of 10 GB, room for 10, ``--requests``
   (200,000) requests; a load takes 1.5 s;
b. ``mixed``: Zipf α=1 over 50 models of mixed sizes (0.5–70 GB) and reload costs (a
   load 1 s plus its bytes at 2 GB/s, times a factor within 1/8–8: storage and
   engine start-up differ), room for a fifth of their bytes; a request every 100 s
   on average (a miss loads for 14 s on average, up to 110 s);
c. ``bursty``: the mixed models, each alternating quiet (25 min) and busy (5 min)
   spells;
d. ``shift``: the mixed models, popularity drawn again every 5 hours (every 180
   requests).

(b)–(d) have ``--others`` (50,000) requests each. Runs go ``--jobs`` (2) at a time.
The policies age their request counts by requests (``history_half_life_requests``,
1000), so the spacing of requests changes only how often loads overlap.

Keys (last line, JSON): ``zipf_equal_vs_belady`` (the best policy's hit ratio ÷
Belady's, goal ≥ 0.85), ``mixed_load_seconds_vs_lru`` (the best policy's seconds
spent loading ÷ LRU's, goal ≤ 0.7), ``bursty_load_seconds_vs_lru`` and
``shift_load_seconds_vs_lru`` (goal ≤ 1.0), ``best`` per trace, ``never_worse``
(policies never worse than LRU in hit ratio on (a) nor in seconds loading on
(b)–(d)), and ``table``: every policy's figures on every trace.

Usage: python bench/eviction.py [--requests 200000] [--others 50000] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script
from routerd.scheduler import SchedulerSettings
from routerd.simulate.costs import ModelCost
from routerd.simulate.generate import GB, Workload, costs_for, generate
from routerd.simulate.run import BELADY, Host, simulate
from routerd.simulate.trace import TraceRequest

POLICIES = ("lru", "lfu", "gdsf", "cost")
SETTINGS = SchedulerSettings(
    min_residency=0.0, keep_alive=math.inf, headroom={"cuda": 0}, poll_interval=3600.0
)


def workloads(requests: int, others: int) -> dict[str, Workload]:
    mixed = Workload(
        kind="zipf",
        requests=others,
        models=50,
        rate=0.01,
        alpha=1.0,
        sizes="mixed",
        cost_spread=8.0,
        seed=3,
    )
    return {
        "zipf_equal": Workload(
            kind="zipf",
            requests=requests,
            models=100,
            rate=0.2,
            alpha=1.0,
            size=10 * GB,
            disk_gbps=10.0,
            load_fixed_s=0.5,
            seed=1,
        ),
        "mixed": mixed,
        "bursty": replace(mixed, kind="bursty", quiet_s=1500.0, busy_s=300.0, seed=4),
        "shift": replace(mixed, kind="shift", shift_every=18_000.0, seed=5),
    }


def scenario(workload: Workload) -> tuple[list[TraceRequest], dict[str, ModelCost], Host]:
    trace = generate(workload)
    costs = {m: replace(c, per_token_s=0.0, request_s=0.05) for m, c in costs_for(workload).items()}
    if workload.sizes == "equal":
        memory = 10 * workload.size + GB // 2
    else:
        memory = sum(c.bytes for c in costs.values()) // 5
    return trace, costs, Host(memory=memory, settings=SETTINGS)


def run_one(job: tuple[str, Workload, str]) -> tuple[str, str, dict[str, Any]]:
    name, workload, policy = job
    trace, costs, host = scenario(workload)
    return name, policy, simulate(trace, costs, host, policy).to_json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000, help="requests of (a)")
    parser.add_argument("--others", type=int, default=50_000, help="requests of (b)-(d)")
    parser.add_argument("--jobs", type=int, default=2, help="simulations at once")
    args = parser.parse_args()
    jobs = [
        (name, workload, policy)
        for name, workload in workloads(args.requests, args.others).items()
        for policy in (*POLICIES, BELADY)
    ]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for name, policy, result in pool.map(run_one, jobs):
            table.setdefault(name, {})[policy] = result
    figures = summarize(table)
    print(render(table))
    print(json.dumps(figures))
    return 0


def summarize(table: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    zipf = table["zipf_equal"]
    best_hits = max(POLICIES, key=lambda p: zipf[p]["hit_ratio"])
    figures: dict[str, Any] = {
        "zipf_equal_vs_belady": round(zipf[best_hits]["hit_ratio"] / zipf[BELADY]["hit_ratio"], 3),
        "zipf_equal_lru_vs_belady": round(zipf["lru"]["hit_ratio"] / zipf[BELADY]["hit_ratio"], 3),
        "best": {"zipf_equal": best_hits},
    }
    never_worse = {p for p in POLICIES if zipf[p]["hit_ratio"] >= zipf["lru"]["hit_ratio"]}
    for name in ("mixed", "bursty", "shift"):
        results = table[name]
        best = min(POLICIES, key=lambda p: results[p]["load_seconds"])
        lru_s = max(results["lru"]["load_seconds"], 1e-9)
        figures[f"{name}_load_seconds_vs_lru"] = round(results[best]["load_seconds"] / lru_s, 3)
        figures["best"][name] = best
        never_worse &= {p for p in POLICIES if results[p]["load_seconds"] <= lru_s}
    figures["never_worse"] = sorted(never_worse)
    figures["table"] = {
        name: {
            policy: {
                k: r[k]
                for k in ("hit_ratio", "loads", "host_loads", "load_seconds", "thrash", "errors")
            }
            for policy, r in results.items()
        }
        for name, results in table.items()
    }
    return figures


def render(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'trace':12} {'policy':8} {'hit ratio':>10} {'loads':>8} {'load s':>10} {'thrash':>8}"
    ]
    for name, results in table.items():
        for policy, r in results.items():
            lines.append(
                f"{name:12} {policy:8} {r['hit_ratio']:>10.4f} {r['loads']:>8} "
                f"{r['load_seconds']:>10.0f} {r['thrash']:>8}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
