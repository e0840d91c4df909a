"""``routerd simulate``: replay a trace through the daemon's scheduler, per policy.

Where the trace comes from (one of):

- ``--trace FILE`` — JSON lines (``routerd.simulate.trace``), costed by ``--models
  FILE`` or, without it, by the store of ``--state-dir`` (or config's);
- ``--generate zipf|bursty|shift`` — a synthetic workload and its model table
  (``routerd.simulate.generate``); ``--save DIR`` keeps both for another run;
- ``--from-state DIR [--since 24h]`` — that host's own request log and costs.

The host simulated is config's (``--config``: scheduler settings, placement, the
eviction policy, GPU headroom, host tier) with ``--memory`` per GPU, ``--gpus`` and
``--host-cache`` over it. Each ``--policy`` (default: config's eviction policy) runs
on the same trace, and Belady's rule runs beside them as the reference.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from policies import registry as policy_registry
from routerd.config import Config, ConfigError, load_config, parse_duration, parse_size
from routerd.simulate import generate as generators
from routerd.simulate.costs import ModelCost, read_table, table_json
from routerd.simulate.learn import costs_for_trace, learn
from routerd.simulate.report import PolicyResult, render
from routerd.simulate.run import BELADY, Host, host_from_config, simulate
from routerd.simulate.trace import TraceError, TraceRequest, read_trace, write_trace
from state import Store, StoreError

DEFAULT_MEMORY = "24GiB"


def add_parser(commands: Any) -> None:
    """The ``simulate`` subcommand's arguments, on ``routerd``'s parser."""
    p = commands.add_parser(
        "simulate",
        help="replay a trace through the scheduler on virtual time, per eviction policy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="JSON lines: t, model, prompt/completion tokens")
    source.add_argument("--generate", choices=generators.KINDS, help="a synthetic workload")
    source.add_argument("--from-state", type=Path, metavar="DIR", help="a host's state directory")
    p.add_argument("--models", type=Path, help="the model table (JSON); default: from a store")
    p.add_argument("--state-dir", type=Path, help="whose store costs --trace (default: config's)")
    p.add_argument("--since", help="with --from-state: only requests this recent (e.g. 24h)")
    p.add_argument(
        "--policy", action="append", help="an eviction policy to run (repeat for several)"
    )
    p.add_argument("--memory", help=f"memory of each simulated GPU (default {DEFAULT_MEMORY})")
    p.add_argument("--gpus", type=int, default=1, help="simulated GPUs (default 1)")
    p.add_argument("--host-cache", help="the host-RAM tier (default: config's devices.host_cache)")
    p.add_argument("--config", type=Path, help="TOML config whose scheduler is simulated")
    p.add_argument(
        "--thrash-window", default="60s", help="a reload this soon after eviction is thrash"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save", type=Path, metavar="DIR", help="write trace.jsonl and models.json")
    gen = p.add_argument_group("--generate")
    defaults = generators.Workload()
    gen.add_argument("--requests", type=int, default=defaults.requests)
    gen.add_argument("--model-count", type=int, default=defaults.models)
    gen.add_argument("--rate", type=float, default=defaults.rate, help="requests per second")
    gen.add_argument("--alpha", type=float, default=defaults.alpha, help="Zipf exponent")
    gen.add_argument("--sizes", choices=generators.SIZES, default=defaults.sizes)
    gen.add_argument("--size", default="14GB", help="each model's bytes (--sizes equal)")
    gen.add_argument("--busy-factor", type=float, default=defaults.busy_factor)
    gen.add_argument("--shift-every", default="1h", help="between popularity changes (shift)")
    gen.add_argument("--seed", type=int, default=defaults.seed)


def run(args: argparse.Namespace) -> int:
    """The subcommand: 0, or 2 with a message on stderr for anything it cannot use."""
    try:
        config = load_config(args.config)
        trace, costs, host, notes = _inputs(args, config)
        policies = args.policy or [config.scheduler.eviction]
        for name in policies:
            if name != BELADY:
                policy_registry.check("eviction", name)
        results = [simulate(trace, costs, host, name) for name in _unique([*policies, BELADY])]
    except (ConfigError, TraceError, StoreError, ValueError) as exc:
        print(f"routerd simulate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_report(results, trace, costs, host, notes), indent=2))
    else:
        print(_describe(trace, costs, host))
        for note in notes:
            print(f"note: {note}")
        print(render(results, reference=BELADY))
    return 0


def _inputs(
    args: argparse.Namespace, config: Config
) -> tuple[list[TraceRequest], dict[str, ModelCost], Host, list[str]]:
    notes: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    if args.generate:
        workload = generators.Workload(
            kind=args.generate,
            requests=args.requests,
            models=args.model_count,
            rate=args.rate,
            alpha=args.alpha,
            sizes=args.sizes,
            size=parse_size(args.size, key="--size"),
            busy_factor=args.busy_factor,
            shift_every=parse_duration(args.shift_every, key="--shift-every"),
            seed=args.seed,
        )
        trace = generators.generate(workload)
        costs = read_table(args.models) if args.models else generators.costs_for(workload)
    elif args.from_state:
        since = None
        if args.since:
            since = time.time() - parse_duration(args.since, key="--since")
        store = _open_store(args.from_state)
        try:
            learned = learn(store, since=since)
        finally:
            store.close()
        trace, costs, options, notes = learned.trace, learned.costs, learned.options, learned.notes
        if args.models:
            costs = read_table(args.models)
    else:
        trace = read_trace(args.trace)
        if args.models:
            costs = read_table(args.models)
        else:
            store = _open_store(args.state_dir or config.state_dir)
            try:
                costs = costs_for_trace(store, (r.model for r in trace))
            finally:
                store.close()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        with (args.save / "trace.jsonl").open("w", encoding="utf-8") as out:
            write_trace(trace, out)
        (args.save / "models.json").write_text(json.dumps(table_json(costs), indent=2) + "\n")
    return trace, costs, _host(args, config, options), notes


def _open_store(state_dir: Path) -> Store:
    path = Path(state_dir) / "routerd.db"
    if not path.is_file():
        raise ValueError(f"no routerd store at {path}")
    return Store.open(path)


def _host(args: argparse.Namespace, config: Config, options: dict[str, dict[str, Any]]) -> Host:
    host_cache = None
    if args.host_cache is not None:
        host_cache = parse_size(args.host_cache, key="--host-cache")
    return host_from_config(
        config,
        parse_size(args.memory or DEFAULT_MEMORY, key="--memory"),
        gpus=args.gpus,
        host_cache=host_cache,
        options=options,
        thrash_window=parse_duration(args.thrash_window, key="--thrash-window"),
    )


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _describe(trace: list[TraceRequest], costs: dict[str, ModelCost], host: Host) -> str:
    span = trace[-1].t - trace[0].t
    tier = f", host tier {host.host_cache / 1024**3:.1f} GiB" if host.host_cache else ""
    return (
        f"{len(trace)} requests over {span / 3600:.2f} h for {len(costs)} models; "
        f"{host.gpus} GPU(s) of {host.memory / 1024**3:.1f} GiB{tier}"
    )


def _report(
    results: list[PolicyResult],
    trace: list[TraceRequest],
    costs: dict[str, ModelCost],
    host: Host,
    notes: list[str],
) -> dict[str, Any]:
    return {
        "requests": len(trace),
        "models": len(costs),
        "memory_bytes": host.memory,
        "gpus": host.gpus,
        "host_cache_bytes": host.host_cache,
        "settings": {
            k: None if isinstance(v, float) and math.isinf(v) else v
            for k, v in asdict(host.settings).items()
            if k != "headroom"
        },
        "notes": notes,
        "reference": BELADY,
        "policies": [r.to_json() for r in results],
    }
