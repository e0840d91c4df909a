"""The host-RAM tier on a CUDA GPU: swap-in speed against a plain pinned copy, and two
demo models swapping through the tier on one GPU.

1. ``pinned_h2d_gbps``: one pinned host buffer of demo-large's weight bytes copied to
   the GPU (non-blocking, then one synchronisation), best of 5.
2. ``tier_swap_in_gbps``: demo-large loaded by the transformers backend on the GPU,
   offloaded (weights to pinned host memory), then ``restore``d: its weight bytes ÷
   the restore's seconds, best of 5; ``swap_in_over_copy`` = that ÷ the plain copy
   (1.0 would be the copy engine's own speed). ``offload_freed_ratio``: what NVML
   shows freed by the offload ÷ the instance's measured bytes (everything leaves
   the GPU).
3. Two models, one GPU: demo-medium and demo-large in one scheduler whose GPU headroom
   leaves room for one of them at a time, ``host_cache`` holding both; requests
   alternate between them. ``two_model_swaps`` counts loads that came back from the
   tier (``source: host``), ``two_model_swap_in_ms`` their durations, and
   ``two_model_max_over_budget_bytes`` the worst of NVML's reading of this process
   beyond the capacity the ledger gave out, sampled after every step (goal 0).

Runs with what a GPU machine has without a package index: whatever it cannot import
(torch, transformers, the routerd package's dependencies) or find (a GPU) is skipped
with a line saying why, and its keys are null. Prints one JSON object last.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROUNDS = 5


def skip(result: dict[str, Any], part: str, why: str) -> None:
    print(f"skipped {part}: {why}")
    result.setdefault("skipped", {})[part] = why


def pinned_copy_gbps(torch: Any, nbytes: int) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda:0")
    best = float("inf")
    for _ in range(ROUNDS + 1):  # the first is a warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del host, device
    torch.cuda.empty_cache()
    return nbytes / best / 1e9


def our_gpu_bytes() -> int | None:
    from routerd.devices import NvmlProbe

    probe = NvmlProbe.open()
    if probe is None:
        return None
    import os

    return probe.processes(0).get(os.getpid())


def tier_swap_in(result: dict[str, Any], torch: Any, demo: Path) -> None:
    from backends.base import LoadSpec
    from backends.hf_transformers import TransformersBackend

    model: Any = TransformersBackend().load(
        LoadSpec("demo-large", "1", str(demo / "demo-large"), {}, "cuda:0")
    )
    model.warm_up()
    measured = model.measure_footprint()
    weights = measured.weights
    result["weight_bytes"] = weights
    copy_gbps = pinned_copy_gbps(torch, weights)
    result["pinned_h2d_gbps"] = round(copy_gbps, 2)
    best = float("inf")
    freed: list[float] = []
    for _ in range(ROUNDS):
        before = our_gpu_bytes()
        model.offload()
        after = our_gpu_bytes()
        if before is not None and after is not None:
            freed.append((before - after) / measured.total)
        started = time.perf_counter()
        model.restore()
        best = min(best, time.perf_counter() - started)
    model.unload()
    tier_gbps = weights / best / 1e9
    result["tier_swap_in_gbps"] = round(tier_gbps, 2)
    result["swap_in_over_copy"] = round(tier_gbps / copy_gbps, 3)
    result["offload_freed_ratio"] = round(min(freed), 3) if freed else None
    print(f"pinned copy {copy_gbps:.2f} GB/s, tier swap-in {tier_gbps:.2f} GB/s")


async def two_models(result: dict[str, Any], demo: Path, work: Path) -> None:
    from dataclasses import replace

    from routerd.app import build_services
    from routerd.config import Config, DevicesConfig, SchedulerConfig, ServerConfig
    from routerd.devices import DeviceInventory, NvmlProbe
    from state import VersionSpec

    names = ("demo-medium", "demo-large")
    options = {"device": "cuda:0", "max_concurrency": 1}
    config = Config(
        state_dir=work / "state",
        models=tuple(VersionSpec(n, "1", "transformers", str(demo / n), options) for n in names),
        scheduler=SchedulerConfig(min_residency=0.0),
        server=ServerConfig(model_roots=(demo,)),
        devices=DevicesConfig(cpu_memory=0),
    )
    first = build_services(config, devices=DeviceInventory(NvmlProbe.open(), cpu_budget=0))
    try:
        for name in names:
            await first.scheduler.load(first.router.resolve(name))
            await first.scheduler.evict(f"{name}@1")
        sizes = {n: first.store.measured_footprint(n, "1", "cuda") for n in names}
        row = next(r for r in first.scheduler.ledger() if r.device == "cuda:0")
    finally:
        await first.scheduler.close()
        first.store.close()
    medium, large = (sizes[n].measured_bytes for n in names)
    # Room for the larger and half the other: they cannot both be on the GPU.
    headroom = max(row.budget - row.foreign - (large + medium // 2), 0)
    devices = replace(config.devices, gpu_headroom=headroom, host_cache=2 * (medium + large))
    services = build_services(
        replace(config, devices=devices), devices=DeviceInventory(NvmlProbe.open(), cpu_budget=0)
    )
    worst = 0
    try:
        for turn in range(6):
            name = names[turn % 2]
            async with services.scheduler.lease(services.router.resolve(name)):
                pass
            gpu = next(r for r in services.scheduler.ledger() if r.device == "cuda:0")
            ours = our_gpu_bytes() or 0
            worst = max(worst, ours - gpu.capacity, gpu.over_budget)
        events = list(reversed(services.store.events(limit=50)))
    finally:
        await services.scheduler.close()
        services.store.close()
    back = [e for e in events if e.kind == "load" and (e.detail or {}).get("source") == "host"]
    result["two_model_swaps"] = len(back)
    result["two_model_swap_in_ms"] = [e.duration_ms for e in back]
    result["two_model_max_over_budget_bytes"] = max(worst, 0)
    print(f"two models on one GPU: {len(back)} swaps from the tier, worst over budget {worst}")


def main() -> dict[str, Any]:
    result: dict[str, Any] = {
        "pinned_h2d_gbps": None,
        "tier_swap_in_gbps": None,
        "swap_in_over_copy": None,
        "offload_freed_ratio": None,
        "two_model_swaps": None,
        "two_model_swap_in_ms": None,
        "two_model_max_over_budget_bytes": None,
    }
    try:
        import torch
    except ImportError as exc:
        skip(result, "everything", f"torch cannot be imported ({exc})")
        return result
    if not torch.cuda.is_available():
        skip(result, "everything", "torch sees no CUDA device")
        return result
    with tempfile.TemporaryDirectory(prefix="routerd-gpu-tier-") as tmp:
        work = Path(tmp)
        demo = work / "demo"
        try:
            from routerd.demo import ensure_demo_models

            ensure_demo_models(demo, ["demo-medium", "demo-large"])
        except ImportError as exc:
            result["pinned_h2d_gbps"] = round(pinned_copy_gbps(torch, 100 << 20), 2)
            skip(result, "tier and two models", f"cannot import {exc.name or exc}")
            return result
        try:
            tier_swap_in(result, torch, demo)
        except ImportError as exc:
            skip(result, "tier swap-in", f"cannot import {exc.name or exc}")
        try:
            asyncio.run(two_models(result, demo, work))
        except ImportError as exc:
            skip(result, "two models", f"cannot import {exc.name or exc}")
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
