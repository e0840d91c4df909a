"""routerd's own overhead: routerd against a bare aiohttp server, side by side in one run.

Two servers run as subprocesses on loopback ports:

- **routerd** — ``routerd serve`` with a temporary state dir and a TOML config that
  registers one ``echo`` model (a backend that answers at once, see
  ``backends/echo.py``) on a temporary folder; batching ``none`` by default, so the
  figures show the cost of routerd's path (HTTP, validation, routing, lease, the
  instance queue and thread hops, response building), not a batching wait
  (``--batching dynamic`` measures the daemon's default policy instead). The echo
  model at zero latency says its calls never block (``ModelInfo.inline``), so
  routerd calls it on the event loop; ``--threaded`` sets its ``inline`` option to
  false, which puts it on its instance thread as a compute backend would be, and
  shows what the two thread hops per request cost.
- **bare** — a minimal aiohttp app on the same event loop kind (uvloop when
  installed) that parses the JSON body of ``POST /v1/completions`` and answers with
  the very bytes routerd answered (captured once, headers ``x-routerd-*`` included),
  so both send responses of the same size.

The same client (one aiohttp ``ClientSession`` per run, keep-alive, one connection
per concurrent worker) sends the same request body to each, at concurrency 1 and
64: a warm-up, then ``--requests`` requests (or fewer if ``--duration`` seconds run
out). Each of ``--rounds`` rounds measures the two targets back to back (which goes
first alternates) and compares them with each other: the figures below are the
median over rounds of these paired comparisons. On a shared machine a run can be
slowed for a second by a neighbour; a pair measured within the same second shares
that luck, where the best round of each target taken apart may pair a lucky second
of one with an ordinary second of the other. The best rounds are printed too.

Usage: python bench/router_overhead.py [--requests 5000] [--duration 60] [--rounds 5]
       [--batching none|dynamic] [--threaded] [--profile FILE]  (cProfile of routerd's main thread)

Prints a table of each target's best round, then as its last line one JSON object:
``rps_ratio`` (routerd ÷ bare requests per second at concurrency 64),
``added_p50_ms`` and ``added_p99_ms`` (routerd minus bare latency at concurrency 1),
``added_server_cpu_ms`` (routerd minus bare server CPU per request at concurrency
64, read from ``/proc``), each the median over rounds of the paired figures;
``rps_ratios`` (each round's ratio), ``rps_ratio_best`` (best round ÷ best round),
and each target's best round per concurrency under ``c1`` and ``c64``.
Goal: rps_ratio ≥ 0.6 and added_p50_ms ≤ 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from servers import ServerProcess, free_port, new_loop

MODEL = "echo"
REQUEST = {"model": MODEL, "prompt": "Say hello to routerd, please.", "max_tokens": 16}
CONCURRENCIES = (1, 64)
# routerd then calls the echo model on its instance thread, like a compute backend.
THREADED_OPTION = "inline = false"


# -- the bare server (run as ``--serve-bare PORT --body FILE`` in a subprocess) ---------


def serve_bare(port: int, body_file: Path) -> None:
    captured = json.loads(body_file.read_text())
    body = captured["body"].encode()
    headers = captured["headers"]

    async def completions(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/ready", ready)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=new_loop())


# -- the servers under test --------------------------------------------------------------


def routerd_config(work: Path, port: int, batching: str, threaded: bool) -> Path:
    folder = work / "echo-model"
    folder.mkdir()
    config = work / "routerd.toml"
    config.write_text(
        f"""log_level = "warning"

[server]
host = "127.0.0.1"
port = {port}
model_roots = ["{work}"]

[scheduler]
keep_alive = -1

[[models]]
name = "{MODEL}"
backend = "echo"
path = "{folder}"

[models.options]
batching = "{batching}"
{THREADED_OPTION if threaded else ""}
"""
    )
    return config


# -- the client --------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    index = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[index]


async def run_load(
    server: ServerProcess, body: bytes, concurrency: int, requests: int, duration: float
) -> dict[str, Any]:
    """``requests`` POSTs from ``concurrency`` workers, each on its own kept-alive connection.

    Besides throughput and latency, it reports the CPU the server process used per
    request (``server_cpu_ms``) and the client's (``client_cpu_ms``): steadier than
    wall-clock figures on a busy machine.
    """
    url = server.url + "/v1/completions"
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    issued = 0

    async def worker(session: aiohttp.ClientSession, count: int, deadline: float) -> None:
        nonlocal issued, errors
        while issued < count and time.perf_counter() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm_up = max(2 * concurrency, min(200, requests // 10))
        deadline = time.perf_counter() + duration
        await asyncio.gather(*(worker(session, warm_up, deadline) for _ in range(concurrency)))
        latencies.clear()
        errors = issued = 0
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(worker(session, requests, deadline) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        server_cpu = server.cpu_seconds() - server_cpu
        client_cpu = time.process_time() - client_cpu
    latencies.sort()
    done = max(len(latencies), 1)
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p90_ms": round(percentile(latencies, 0.90) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(sum(latencies) / done * 1000, 3),
        "server_cpu_ms": round(server_cpu / done * 1000, 3),
        "client_cpu_ms": round(client_cpu / done * 1000, 3),
    }


# -- the run -----------------------------------------------------------------------------


async def capture(session: aiohttp.ClientSession, url: str, body: bytes) -> dict[str, Any]:
    """One real routerd answer: the bytes and headers the bare server will send back."""
    headers = {"Content-Type": "application/json"}
    async with session.post(url + "/v1/completions", data=body, headers=headers) as response:
        text = await response.text()
        if response.status != 200:
            raise RuntimeError(f"routerd answered {response.status}: {text}")
        extra = {k: v for k, v in response.headers.items() if k.lower().startswith("x-routerd-")}
    extra.pop("x-routerd-cold-start-ms", None)
    return {"body": text, "headers": extra}


def better(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    return b if a is None or b["rps"] > a["rps"] else a


async def bench(
    args: argparse.Namespace, work: Path, servers: list[ServerProcess]
) -> dict[str, Any]:
    body = json.dumps(REQUEST).encode()
    routerd_port, bare_port = free_port(), free_port()
    config = routerd_config(work, routerd_port, args.batching, args.threaded)
    argv = [sys.executable]
    if args.profile:
        argv += ["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
    argv += ["-m", "routerd", "serve", "--config", str(config), "--state-dir", str(work / "state")]
    routerd = ServerProcess("routerd", argv, routerd_port, work / "routerd.log")
    servers.append(routerd)
    async with aiohttp.ClientSession() as session:
        await routerd.wait_ready(session)
        answer = await capture(session, routerd.url, body)  # also loads and warms the model
        body_file = work / "bare-body.json"
        body_file.write_text(json.dumps(answer))
        bare_argv = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(bare_port)]
        bare_argv += ["--body", str(body_file)]
        bare = ServerProcess("bare", bare_argv, bare_port, work / "bare.log")
        servers.append(bare)
        await bare.wait_ready(session)

    results: dict[int, dict[str, dict[str, Any] | None]] = {
        c: {"routerd": None, "bare": None} for c in CONCURRENCIES
    }
    # each round's pair of runs, measured back to back: compared with each other only
    paired: dict[int, list[dict[str, dict[str, Any]]]] = {c: [] for c in CONCURRENCIES}
    for round_ in range(args.rounds):
        for concurrency in CONCURRENCIES:
            # alternate which target goes first, so drift does not favour one side
            order = [routerd, bare] if round_ % 2 == 0 else [bare, routerd]
            pair: dict[str, dict[str, Any]] = {}
            for server in order:
                figures = await run_load(server, body, concurrency, args.requests, args.duration)
                best = results[concurrency]
                best[server.name] = better(best[server.name], figures)
                pair[server.name] = figures
                print(
                    f"  round {round_ + 1} c={concurrency:<3} {server.name:<8} "
                    f"{figures['rps']:>9.1f} req/s  p50 {figures['p50_ms']:.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
            paired[concurrency].append(pair)
    return {"results": results, "paired": paired, "response_bytes": len(answer["body"])}


def report(args: argparse.Namespace, outcome: dict[str, Any]) -> dict[str, Any]:
    results = outcome["results"]
    columns = ("requests", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "server_cpu_ms")
    print(f"{'target':<8} {'conc':>4} " + " ".join(f"{c:>13}" for c in columns))
    for concurrency in CONCURRENCIES:
        for name in ("routerd", "bare"):
            figures = results[concurrency][name]
            print(f"{name:<8} {concurrency:>4} " + " ".join(f"{figures[c]:>13}" for c in columns))
    low, high = CONCURRENCIES[0], CONCURRENCIES[-1]
    paired = outcome["paired"]

    def paired_median(
        concurrency: int, of: Callable[[dict[str, Any], dict[str, Any]], float]
    ) -> float:
        return round(statistics.median(of(p["routerd"], p["bare"]) for p in paired[concurrency]), 3)

    ratios = [round(p["routerd"]["rps"] / p["bare"]["rps"], 3) for p in paired[high]]
    best_high = results[high]
    summary: dict[str, Any] = {
        "rps_ratio": paired_median(high, lambda r, b: r["rps"] / b["rps"]),
        "added_p50_ms": paired_median(low, lambda r, b: r["p50_ms"] - b["p50_ms"]),
        "added_p99_ms": paired_median(low, lambda r, b: r["p99_ms"] - b["p99_ms"]),
        "added_server_cpu_ms": paired_median(
            high, lambda r, b: r["server_cpu_ms"] - b["server_cpu_ms"]
        ),
        "rps_ratios": ratios,
        "rps_ratio_best": round(best_high["routerd"]["rps"] / best_high["bare"]["rps"], 3),
    }
    print(
        f"\nrouterd ÷ bare at c={high}: {summary['rps_ratio']:.2f}× req/s "
        f"(goal ≥ 0.6; median of the rounds' ratios {ratios}); added latency at c={low}: "
        f"p50 {summary['added_p50_ms']:.3f} ms (goal ≤ 0.5), p99 {summary['added_p99_ms']:.3f} ms; "
        f"server CPU per request at c={high}: "
        f"+{summary['added_server_cpu_ms']:.3f} ms"
    )
    for concurrency in CONCURRENCIES:
        summary[f"c{concurrency}"] = results[concurrency]
    summary.update(
        requests=args.requests,
        rounds=args.rounds,
        batching=args.batching,
        threaded=args.threaded,
        response_bytes=outcome["response_bytes"],
        cpus=os.cpu_count(),
        python=platform.python_version(),
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="per target and concurrency")
    parser.add_argument("--duration", type=float, default=60.0, help="cap in seconds per run")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of paired runs")
    parser.add_argument("--batching", choices=["none", "dynamic"], default="none")
    parser.add_argument(
        "--threaded", action="store_true", help="echo model on its instance thread (blocking)"
    )
    parser.add_argument("--profile", help="write a cProfile of routerd's main thread here")
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--body", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.body)
        return 0
    if args.requests < 1 or args.rounds < 1 or args.duration <= 0:
        parser.error("--requests, --rounds and --duration must be positive")

    servers: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="routerd-overhead-") as tmp:
        loop = new_loop()
        try:
            outcome = loop.run_until_complete(bench(args, Path(tmp), servers))
        finally:
            loop.close()
            for server in reversed(servers):
                server.stop()
        summary = report(args, outcome)
    if args.profile:
        print(f"profile of routerd written to {args.profile}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
