"""Dynamic batching against batches of one, side by side in one run.

32 concurrent clients send requests over loopback HTTP to one routerd (in this
process, on its own port), first to a version with ``batching = "none"``, then to
the same model folder registered with ``batching = "dynamic"``; for demo-embed
(embeddings) and a demo LM (completions). The ratios (dynamic ÷ none) are what
count: both sides run on the same machine, minutes apart at most.

Usage: python bench/batching.py [--clients 32] [--embed-requests 640] [--lm-requests 96]
Ends with one JSON line: embed_throughput_ratio, embed_p95_ratio, lm_throughput_ratio,
lm_p95_ratio, plus the raw figures. Goal for embeddings: ≥ 3× throughput at ≤ 1.1× p95.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routerd.app import build_app, build_services
from routerd.config import Config, SchedulerConfig, ServerConfig
from routerd.demo import ensure_demo_models
from state import VersionSpec

LM = "demo-medium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def drive(url: str, body: dict[str, Any], clients: int, total: int) -> dict[str, float]:
    """``total`` requests from ``clients`` concurrent loops; throughput and latencies."""
    latencies: list[float] = []
    remaining = total

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{response.status}: {await response.text()}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, json=body) as warm:  # load + warm up first
            await warm.read()
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": total / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1000,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="routerd-bench-"))
    demo = ensure_demo_models(work / "demo", ["demo-embed", LM])
    folders = {m.name: m.path for m in demo}
    models = []
    for name, folder in folders.items():
        for batching in ("none", "dynamic"):
            models.append(
                VersionSpec(
                    name=f"{name}-{batching}",
                    version="1",
                    backend="transformers",
                    path=folder,
                    options=(
                        {"batching": "dynamic", "max_batch_size": args.clients, "max_wait_ms": 5.0}
                        if batching == "dynamic"
                        else {"batching": "none"}
                    ),
                )
            )
    config = Config(
        state_dir=work / "state",
        models=tuple(models),
        scheduler=SchedulerConfig(min_residency=0.0),
        server=ServerConfig(model_roots=(work,)),
    )
    services = build_services(config)
    runner = web.AppRunner(build_app(services))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/v1"
    figures: dict[str, dict[str, float]] = {}
    try:
        for batching in ("none", "dynamic"):
            figures[f"embed_{batching}"] = await drive(
                f"{base}/embeddings",
                {"model": f"demo-embed-{batching}", "input": "a short sentence to embed"},
                args.clients,
                args.embed_requests,
            )
            figures[f"lm_{batching}"] = await drive(
                f"{base}/completions",
                {
                    "model": f"{LM}-{batching}",
                    "prompt": "def main():",
                    "max_tokens": 16,
                    "temperature": 0,
                },
                args.clients,
                args.lm_requests,
            )
    finally:
        await runner.cleanup()
    for key, row in figures.items():
        print(
            f"{key:14s} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
            f"p95 {row['p95_ms']:7.1f} ms"
        )
    result: dict[str, Any] = {
        "embed_throughput_ratio": figures["embed_dynamic"]["rps"] / figures["embed_none"]["rps"],
        "embed_p95_ratio": figures["embed_dynamic"]["p95_ms"] / figures["embed_none"]["p95_ms"],
        "lm_throughput_ratio": figures["lm_dynamic"]["rps"] / figures["lm_none"]["rps"],
        "lm_p95_ratio": figures["lm_dynamic"]["p95_ms"] / figures["lm_none"]["p95_ms"],
        "clients": args.clients,
        "raw": figures,
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--embed-requests", type=int, default=640)
    parser.add_argument("--lm-requests", type=int, default=96)
    outcome = asyncio.run(main(parser.parse_args()))
    print(
        json.dumps(
            {
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in outcome.items()
                if k != "raw"
            }
            | {"raw": outcome["raw"]}
        )
    )
