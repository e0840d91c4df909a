"""Simulator fidelity: one trace through the real daemon and through ``routerd simulate``.

1. ``routerd serve --demo`` (a subprocess, loopback, a temporary state dir) serves
   once with room for every model, which loads each once so its footprint is stored,
   and is then restarted with a CPU budget that holds demo-large and one demo-medium
   (or three demo-mediums) but not more. Its models: demo-small, demo-large and
   ``--mediums`` copies of demo-medium registered under names of their own.
2. A Zipf trace (``routerd.simulate.generate``: ``--requests`` at ``--rate`` per
   second, α ``--alpha``, 4–16 completion tokens) is sent to it as timed: each
   request at its time, whatever the answers before it. Loads and evictions happen
   as the trace makes them.
3. The daemon's figures come from its own store (``routerd.simulate.learn`` and
   ``report.summarize``): the events and request log of the trace's window. The
   simulator then replays the same trace, with the model table learned from that
   store and the daemon's config, through the daemon's scheduler on virtual time.
4. The same workload, 100,000 requests long, is simulated once more and timed.

Keys (last line, JSON): ``daemon_loads``, ``sim_loads``, ``loads_ratio`` (sim ÷
daemon, goal 0.9–1.1), ``load_seconds_ratio`` (goal 0.8–1.25), ``hit_ratio_diff``
(|sim − daemon|, goal ≤ 0.03), ``sim_seconds_for_100k`` (goal ≤ 60), and the figures
behind them.

Usage: python bench/sim_fidelity.py [--requests 400] [--rate 3] [--alpha 0.9]
       [--mediums 3] [--seed 11] [--big 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from servers import ROOT, free_port
from soak import Daemon

sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, the repository not
from routerd.config import Config, load_config
from routerd.demo import ensure_demo_models
from routerd.simulate.generate import Workload, generate
from routerd.simulate.learn import Learned, learn
from routerd.simulate.report import Outcome, PolicyResult, summarize
from routerd.simulate.run import host_from_config, simulate
from routerd.simulate.trace import TraceRequest
from state import Store

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "routerd",
    "packed",
    "models",
    "into",
    "memory",
]
REQUEST_TIMEOUT_S = 120.0


def model_names(mediums: int) -> list[str]:
    """Most popular first: the Zipf ranks of the trace."""
    names = [f"medium-{chr(ord('a') + i)}" for i in range(mediums)]
    return [names[0], "large", *names[1:], "small"]


def write_config(
    path: Path, budget: int | str, demo: Path, mediums: int, eviction: str | None = None
) -> None:
    models = [("large", "demo-large"), ("small", "demo-small")]
    models += [(name, "demo-medium") for name in model_names(mediums) if name.startswith("med")]
    entries = "".join(
        f'\n[[models]]\nname = "{name}"\nversion = "1"\nbackend = "transformers"\n'
        f'path = "{demo / folder}"\noptions = {{ device = "cpu" }}\n'
        for name, folder in models
    )
    path.write_text(
        f"""log_level = "warning"

[scheduler]
min_residency = "0s"
load_wait_timeout = "60s"
keep_alive = -1
{f'eviction = "{eviction}"' if eviction else ""}

[devices]
cpu_memory = {json.dumps(budget)}
cpu_headroom = 0
gpu_headroom = 0
poll_interval = "1s"

[request_log]
flush_interval = "250ms"
{entries}"""
    )


def renamed(trace: list[TraceRequest], names: list[str]) -> list[TraceRequest]:
    """The generator's ``model-k`` as this bench's k-th model."""
    return [replace(r, model=names[int(r.model.split("-")[1])]) for r in trace]


async def calibrate(work: Path, session: aiohttp.ClientSession, names: list[str]) -> dict[str, int]:
    """Load every model once with room to spare (footprints stored); their bytes."""
    config = work / "calibrate.toml"
    write_config(config, "8GiB", work / "state" / "demo", len(names) - 2)
    daemon = Daemon(config, work / "state", free_port(), work / "routerd.log", "on")
    try:
        await daemon.wait_ready(session)
        for name in names:
            await daemon.call("POST", "/admin/load", {"model": name})
        status = await daemon.call("GET", "/admin/status")
    finally:
        await daemon.stop()
    return {i["model"]: int(i["measured_bytes"]) for i in status["instances"]}


async def send(
    session: aiohttp.ClientSession, url: str, request: TraceRequest, start: float
) -> int:
    await asyncio.sleep(max(start + request.t - time.monotonic(), 0.0))
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(request.prompt_tokens))
    body = {"model": request.model, "prompt": prompt, "max_tokens": request.completion_tokens}
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            await response.read()
            return response.status
    except (TimeoutError, aiohttp.ClientError):
        return 0


def daemon_result(store: Store, since: float, until: float, window: float) -> PolicyResult:
    events = [e for e in store.events(limit=1 << 62) if since <= e.ts <= until]
    outcomes = [Outcome(r.status, r.waited_ms) for r in store.requests(since=since, until=until)]
    return summarize("daemon", events, outcomes, thrash_window=window)


@dataclass
class DaemonRun:
    workload: Workload
    budget: int
    config: Config
    measured: dict[str, int]
    lost: int
    learned: Learned
    result: PolicyResult


async def run_daemon(args: argparse.Namespace, work: Path) -> DaemonRun:
    """Steps 1–3: the trace through a real daemon, and what its store says of it."""
    names = model_names(args.mediums)
    ensure_demo_models(work / "state" / "demo")
    workload = Workload(
        kind="zipf",
        requests=args.requests,
        models=len(names),
        rate=args.rate,
        alpha=args.alpha,
        prompt_tokens=(4, 24),
        completion_tokens=(4, 16),
        seed=args.seed,
    )
    trace = renamed(generate(workload), names)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        measured = await calibrate(work, session, names)
        medium = measured["medium-a"]
        budget = measured["large"] + measured["small"] + int(medium * 1.5)
        config = work / "routerd.toml"
        write_config(config, budget, work / "state" / "demo", args.mediums, args.eviction)
        daemon = Daemon(config, work / "state", free_port(), work / "routerd.log", "on")
        try:
            await daemon.wait_ready(session)
            since = time.time()
            start = time.monotonic()
            statuses = await asyncio.gather(*(send(session, daemon.url, r, start) for r in trace))
            until = time.time()
            await asyncio.sleep(1.0)  # the request log's last flush
        finally:
            await daemon.stop()
    store = Store.open(work / "state" / "routerd.db")
    try:
        learned = learn(store, since=since, until=until)
        real = daemon_result(store, since, until, window=60.0)
    finally:
        store.close()
    lost = sum(1 for s in statuses if s == 0)
    return DaemonRun(workload, budget, load_config(config), measured, lost, learned, real)


def compare(args: argparse.Namespace, run: DaemonRun) -> dict[str, Any]:
    """Step 3's replay and step 4's timed run, beside the daemon's figures."""
    real = run.result
    host = host_from_config(run.config, run.budget)
    versions = [f"{name}@1" for name in model_names(args.mediums)]  # the model table's keys
    policy = run.config.scheduler.eviction  # the daemon's own
    sim = simulate(renamed(generate(run.workload), versions), run.learned.costs, host, policy)
    big_trace = renamed(generate(replace(run.workload, requests=args.big)), versions)
    big = simulate(big_trace, run.learned.costs, host, policy)
    return {
        "requests": args.requests,
        "lost": run.lost,
        "budget_bytes": run.budget,
        "measured_bytes": run.measured,
        "model_table": {m: vars(c) for m, c in run.learned.costs.items()},
        "daemon": real.to_json(),
        "sim": sim.to_json(),
        "daemon_loads": real.loads,
        "sim_loads": sim.loads,
        "loads_ratio": round(sim.loads / max(real.loads, 1), 3),
        "daemon_load_seconds": real.load_seconds,
        "sim_load_seconds": sim.load_seconds,
        "load_seconds_ratio": round(sim.load_seconds / max(real.load_seconds, 1e-9), 3),
        "daemon_hit_ratio": round(real.hit_ratio, 4),
        "sim_hit_ratio": round(sim.hit_ratio, 4),
        "hit_ratio_diff": round(abs(sim.hit_ratio - real.hit_ratio), 4),
        "big_requests": args.big,
        "big_loads": big.loads,
        "sim_seconds_for_100k": round(big.wall_seconds * 100_000 / args.big, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--mediums", type=int, default=3, help="copies of demo-medium")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--big", type=int, default=100_000, help="requests of the timed run")
    parser.add_argument(
        "--eviction",
        help="the daemon's (and so the simulator's) eviction policy; default: its default",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="routerd-fidelity-") as tmp:
        daemon = asyncio.run(run_daemon(args, Path(tmp)))
    figures = compare(args, daemon)
    rows = [
        ("requests (lost)", f"{figures['requests']} ({figures['lost']})", ""),
        ("loads", figures["daemon_loads"], figures["sim_loads"]),
        ("seconds loading", figures["daemon_load_seconds"], figures["sim_load_seconds"]),
        ("hit ratio", figures["daemon_hit_ratio"], figures["sim_hit_ratio"]),
        ("errors", figures["daemon"]["errors"], figures["sim"]["errors"]),
        ("waited p50 ms", figures["daemon"]["waited_p50_ms"], figures["sim"]["waited_p50_ms"]),
    ]
    print(f"{'':18} {'daemon':>12} {'simulator':>12}")
    for name, real, sim in rows:
        print(f"{name:18} {real!s:>12} {sim!s:>12}")
    print(
        f"loads_ratio {figures['loads_ratio']}  load_seconds_ratio "
        f"{figures['load_seconds_ratio']}  hit_ratio_diff {figures['hit_ratio_diff']}  "
        f"sim_seconds_for_100k {figures['sim_seconds_for_100k']} "
        f"({figures['big_loads']} loads)"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
