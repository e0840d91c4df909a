"""The host-RAM tier's half of ``bench/swap.py``: a second daemon with ``host_cache`` on.

1. ``host_swap_s``: demo-large rests in the tier (it expired: a request with
   ``keep_alive: 0``), then ``POST /admin/load`` brings it back, timed by the client as
   ``reload_s`` is; the load event must say ``source: host``. Best of ``rounds``.
2. ``offload_freed_ratio``: demo-large serves a batch that fills its KV reservation
   (``rows`` prompts of nearly its whole context), while the daemon's resident memory
   is sampled; after the offload, (peak − after) ÷ (instance bytes − weight bytes).
   On the CPU the backend already hands a batch's KV and working memory back when
   the batch drains, so much of it is freed before the offload starts; the ratio
   says that none of it is kept once the instance sits in the tier. What the offload
   alone freed is reported beside it (``offload_step_freed_bytes``).
3. ``max_over_budget_bytes``: 30 s of requests rotating over demo-small,
   demo-medium and demo-large from 4 clients, the CPU budget fitting demo-large and
   half of another, the tier holding all their weights. Every 50 ms: the daemon's
   resident memory above its idle start, less what the tier holds, beyond
   ``cpu_memory`` — and the ledger's own over-budget figure. The worst of either.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from memory_truth import tree_rss
from servers import free_port
from soak import Daemon

MODELS = ("demo-small", "demo-medium", "demo-large")
LARGE = "demo-large"
SWAP_LOAD_S = 30.0
CLIENTS = 4
SAMPLE_S = 0.05
KEEP = 300  # keep_alive of the requests that must not send demo-large to the tier


@dataclass(frozen=True)
class Footprints:
    """What the first daemon measured: bytes and weight bytes per model."""

    total: dict[str, int]
    weights: dict[str, int]


async def measure_footprints(daemon: Daemon) -> Footprints:
    """Load and evict each model once on ``daemon``; their measured footprints."""
    total: dict[str, int] = {}
    weights: dict[str, int] = {}
    for model in MODELS:
        snapshot = await daemon.call("POST", "/admin/load", {"model": model})
        total[model] = int(snapshot["measured_bytes"])
        await daemon.call("POST", "/admin/evict", {"model": model})
    events = (await daemon.call("GET", "/admin/events?limit=200"))["events"]
    for event in events:  # newest first: each model's latest load
        if event["kind"] == "load" and event["model"] in total and event["model"] not in weights:
            weights[event["model"]] = int(event["detail"]["weights"])
    return Footprints(total, weights)


async def _instance(daemon: Daemon, model: str) -> dict[str, Any] | None:
    status = await daemon.call("GET", "/admin/status")
    return next((i for i in status["instances"] if i["model"] == model), None)


async def _until_in_tier(daemon: Daemon, model: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        instance = await _instance(daemon, model)
        if instance is not None and instance.get("tier") == "host":
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{model} never reached the host tier: {await _instance(daemon, model)}")


async def _complete(
    session: aiohttp.ClientSession, daemon: Daemon, model: str, prompt: Any, **extra: Any
) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "seed": 1, **extra}
    async with session.post(daemon.url + "/v1/completions", json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {payload}")


async def host_swaps(session: aiohttp.ClientSession, daemon: Daemon, rounds: int) -> list[float]:
    """Seconds to bring demo-large back from the tier, ``rounds`` times."""
    swaps = []
    for _ in range(rounds):
        await _complete(session, daemon, LARGE, "x", keep_alive=0)  # idle at once: to the tier
        await _until_in_tier(daemon, LARGE)
        start = time.perf_counter()
        await daemon.call("POST", "/admin/load", {"model": LARGE})
        swaps.append(time.perf_counter() - start)
    events = (await daemon.call("GET", "/admin/events?limit=200"))["events"]
    sources = [
        (e.get("detail") or {}).get("source")
        for e in events
        if e["kind"] == "load" and e["model"] == LARGE
    ]
    if sources[:rounds] != ["host"] * rounds:
        raise RuntimeError(f"demo-large did not come back from the host tier: {sources}")
    return swaps


@dataclass
class Freed:
    peak: int = 0  # resident bytes at the fullest point of the batch
    before: int = 0  # resident bytes once the batch drained, before the offload
    after: int = 0  # resident bytes once the instance sits in the tier
    ratio: float = 0.0


async def offload_freed(
    session: aiohttp.ClientSession, daemon: Daemon, footprints: Footprints, rows: int
) -> Freed:
    """Fill demo-large's KV reservation, offload it, and compare resident memory."""
    pid = daemon.server.process.pid
    freed = Freed()

    async def sample() -> None:
        while True:
            freed.peak = max(freed.peak, tree_rss(pid)[0])
            await asyncio.sleep(SAMPLE_S)

    await daemon.call("POST", "/admin/load", {"model": LARGE})
    rng = random.Random(11)
    sampler = asyncio.create_task(sample())
    try:
        prompts = [[rng.randrange(5, 1000) for _ in range(2040)] for _ in range(rows)]
        await asyncio.gather(
            *(_complete(session, daemon, LARGE, p, keep_alive=KEEP) for p in prompts)
        )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    freed.before = tree_rss(pid)[0]
    await _complete(session, daemon, LARGE, "x", keep_alive=0)
    await _until_in_tier(daemon, LARGE)
    freed.after = tree_rss(pid)[0]
    beyond_weights = footprints.total[LARGE] - footprints.weights[LARGE]
    freed.ratio = (freed.peak - freed.after) / beyond_weights
    return freed


async def swap_load(
    session: aiohttp.ClientSession,
    daemon: Daemon,
    baseline: int,
    cpu_budget: int,
    seconds: float,
) -> tuple[int, int, int, int]:
    """(worst measured bytes over the CPU budget, worst ledger over-budget, requests
    served, requests refused)."""
    pid = daemon.server.process.pid
    worst = [0, 0]
    done = refused = 0
    stop = time.monotonic() + seconds

    async def watch() -> None:
        while True:
            status = await daemon.call("GET", "/admin/status")
            tier = int(status["host_tier"]["used_bytes"])
            measured = tree_rss(pid)[0] - baseline - tier
            worst[0] = max(worst[0], measured - cpu_budget)
            for device in status["devices"]:
                worst[1] = max(worst[1], int(device["over_budget_bytes"]))
            await asyncio.sleep(SAMPLE_S)

    async def client(n: int) -> None:
        nonlocal done, refused
        turn = n
        while time.monotonic() < stop:
            model = MODELS[turn % len(MODELS)]
            try:
                await _complete(session, daemon, model, "hello " * 20, keep_alive=KEEP)
                done += 1
            except RuntimeError:  # a 503 while the others hold the room: counted
                refused += 1
            turn += 1

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(client(n) for n in range(CLIENTS)))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return max(worst[0], 0), worst[1], done, refused


async def tier_phase(
    work: Path, footprints: Footprints, rounds: int, rows: int, seconds: float = SWAP_LOAD_S
) -> dict[str, Any]:
    """Run the tier's three measurements on a daemon configured from ``footprints``."""
    large = footprints.total[LARGE]
    others = [footprints.total[m] for m in MODELS if m != LARGE]
    cpu_budget = large + min(others) // 2  # demo-large and half of another
    host_cache = int(sum(footprints.weights.values()) * 1.25)
    config = work / "tier.toml"
    config.write_text(
        'log_level = "warning"\n[scheduler]\nmin_residency = "0s"\n'
        f"[devices]\ncpu_memory = {cpu_budget}\nhost_cache = {host_cache}\n"
    )
    daemon = Daemon(config, work / "state", free_port(), work / "tier.log", audit="on")
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await daemon.wait_ready(session)
            baseline = tree_rss(daemon.server.process.pid)[0]
            swaps = await host_swaps(session, daemon, rounds)
            freed = await offload_freed(session, daemon, footprints, rows)
            over, ledger_over, served, refused = await swap_load(
                session, daemon, baseline, cpu_budget, seconds
            )
            events = (await daemon.call("GET", "/admin/events?limit=10000"))["events"]
        finally:
            await daemon.stop()
    tiers = [(e.get("detail") or {}).get("tier") for e in events if e["kind"] == "evict"]
    return {
        "host_swaps": swaps,
        "freed": freed,
        "max_over_budget_measured": over,
        "max_over_budget_ledger": ledger_over,
        "swap_load_requests": served,
        "swap_load_refused": refused,
        "cpu_budget": cpu_budget,
        "host_cache": host_cache,
        "evictions_to_host": tiers.count("host"),
        "evictions_gone": tiers.count("gone"),
    }
