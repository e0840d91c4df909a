"""Swap costs: reading weights, a first load, a reload, against the library's floor.

demo-large, built in a temporary state dir:

1. ``raw_read_gbps``: the safetensors files read with plain ``read`` calls after
   their pages were dropped from the page cache (``posix_fadvise(DONTNEED)``).
   ``weights_gbps``: the same bytes through the transformers backend's load, pages
   dropped first, until every byte of every weight is resident (each tensor is
   read once after the load: a memory map alone reads nothing). ``read_ratio`` =
   weights ÷ raw (goal ≥ 0.8).
2. ``floor_s``: what no load can beat here, the raw read with a warm page cache plus
   the first forward pass (one token) of the freshly loaded model.
3. ``routerd serve --demo`` as a subprocess: ``POST /admin/load`` of demo-large (the
   first load, which profiles: ``first_load_s``), ``POST /admin/evict``, and the
   load again with the footprint now known (``reload_s``, best of ``--rounds``), as
   ``routerctl load`` sees them. ``reload_over_floor`` = reload ÷ floor (goal ≤ 2);
   ``reload_speedup`` = first load ÷ reload.

4. The host-RAM tier (``bench/swap_tier.py``), on a second daemon with ``host_cache``
   on: ``host_swap_s`` (demo-large back from the tier), ``host_swap_speedup`` =
   reload ÷ host swap (goal ≥ 5), ``offload_freed_ratio`` (goal ≥ 0.9) and
   ``max_over_budget_bytes`` over 30 s of swaps between three models (goal 0).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from servers import ROOT, free_port
from soak import Daemon
from swap_tier import Footprints, measure_footprints, tier_phase

sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, the repository not
from backends.base import LoadSpec
from routerd.demo import ensure_demo_models

MODEL = "demo-large"
CHUNK = 16 << 20


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def drop_from_page_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages (those no process maps)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(files: list[Path]) -> tuple[int, float]:
    """Bytes read and seconds taken, reading each file start to end."""
    total, start = 0, time.perf_counter()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while True:
                got = handle.readinto(view)
                if not got:
                    break
                total += got
    return total, time.perf_counter() - start


def load_resident(folder: Path) -> tuple[Any, float]:
    """The backend's load, until every weight byte has been read; (model, seconds)."""
    import torch

    from backends.hf_transformers import TransformersBackend

    spec = LoadSpec(MODEL, "1", str(folder), {}, "cpu")
    start = time.perf_counter()
    model: Any = TransformersBackend().load(spec)
    module = model._model
    with torch.inference_mode():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.sum()  # reads every page of it
    return model, time.perf_counter() - start


def tiny_forward_s(model: Any) -> float:
    """The first forward pass of a freshly loaded model, one token: what every load
    pays after its read (lazy kernel set-up included)."""
    import torch

    module = model._model
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        start = time.perf_counter()
        module(input_ids=ids)
    return time.perf_counter() - start


async def daemon_loads(work: Path, rounds: int) -> tuple[float, list[float], Footprints]:
    """(first load, reloads) in seconds, timed by the client of ``POST /admin/load``,
    and the three models' measured footprints (for the tier's daemon)."""
    config = work / "routerd.toml"
    config.write_text('log_level = "warning"\n[scheduler]\nmin_residency = "0s"\n')
    daemon = Daemon(config, work / "state", free_port(), work / "routerd.log", audit="on")
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            await daemon.wait_ready(session)

            async def load() -> float:
                start = time.perf_counter()
                await daemon.call("POST", "/admin/load", {"model": MODEL})
                return time.perf_counter() - start

            first = await load()
            reloads = []
            for _ in range(rounds):
                await daemon.call("POST", "/admin/evict", {"model": MODEL})
                reloads.append(await load())
            events = await daemon.call("GET", "/admin/events?limit=50")
            profiles = [
                (e.get("detail") or {}).get("profile")
                for e in events.get("events", [])
                if e.get("kind") == "load"
            ]
            if profiles.count("stored") != rounds:
                raise RuntimeError(f"reloads did not reuse the stored footprint: {profiles}")
            footprints = await measure_footprints(daemon)
        finally:
            await daemon.stop()
    return first, reloads, footprints


def main(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="routerd-swap-") as tmp:
        work = Path(tmp)
        ensure_demo_models(work / "state" / "demo", [MODEL])
        folder = work / "state" / "demo" / MODEL
        files = weight_files(folder)

        drop_from_page_cache(files)
        size, raw_cold_s = read_all(files)
        drop_from_page_cache(files)
        model, weights_s = load_resident(folder)
        forward_s = tiny_forward_s(model)
        model.unload()
        del model
        warm_reads = [read_all(files)[1] for _ in range(3)]
        floor_s = min(warm_reads) + forward_s

        first_s, reloads, footprints = asyncio.run(daemon_loads(work, args.rounds))
        tier = asyncio.run(tier_phase(work, footprints, args.rounds, args.rows, args.swap_s))
    reload_s = min(reloads)
    host_swap_s = min(tier["host_swaps"])
    freed = tier["freed"]
    raw_gbps = size / raw_cold_s / 1e9
    weights_gbps = size / weights_s / 1e9
    result: dict[str, Any] = {
        "weight_bytes": size,
        "raw_read_gbps": round(raw_gbps, 3),
        "weights_gbps": round(weights_gbps, 3),
        "read_ratio": round(weights_gbps / raw_gbps, 3),
        "floor_s": round(floor_s, 4),
        "first_load_s": round(first_s, 3),
        "reload_s": round(reload_s, 4),
        "reload_over_floor": round(reload_s / floor_s, 2),
        "reload_speedup": round(first_s / reload_s, 1),
        "host_swap_s": round(host_swap_s, 4),
        "host_swap_speedup": round(reload_s / host_swap_s, 1),
        "offload_freed_ratio": round(freed.ratio, 3),
        "offload_step_freed_bytes": freed.before - freed.after,
        "max_over_budget_bytes": max(
            tier["max_over_budget_measured"], tier["max_over_budget_ledger"]
        ),
        "swap_load_requests": tier["swap_load_requests"],
        "swap_load_refused": tier["swap_load_refused"],
        "evictions_to_host": tier["evictions_to_host"],
        "evictions_gone": tier["evictions_gone"],
        "seconds": round(time.perf_counter() - began, 1),
    }
    rows = [
        ("weights (MiB)", f"{size / (1 << 20):.1f}"),
        ("raw read, cold cache (GB/s)", f"{raw_gbps:.3f}"),
        ("backend load until resident (GB/s)", f"{weights_gbps:.3f}"),
        ("read ratio (goal >= 0.8)", f"{result['read_ratio']:.3f}"),
        ("floor: warm read + tiny forward (s)", f"{floor_s:.4f}"),
        ("first load, profiled (s)", f"{first_s:.3f}"),
        ("reloads, footprint known (s)", ", ".join(f"{r:.3f}" for r in reloads)),
        ("reload / floor (goal <= 2)", f"{result['reload_over_floor']:.2f}"),
        ("host-tier swap-ins (s)", ", ".join(f"{r:.4f}" for r in tier["host_swaps"])),
        ("reload / host swap (goal >= 5)", f"{result['host_swap_speedup']:.1f}"),
        (
            "RSS peak / before / after offload (MiB)",
            "/".join(f"{b / (1 << 20):.0f}" for b in (freed.peak, freed.before, freed.after)),
        ),
        ("offload freed ratio (goal >= 0.9)", f"{freed.ratio:.3f}"),
        (
            "30 s swap load: requests / refused",
            f"{tier['swap_load_requests']} / {tier['swap_load_refused']}",
        ),
        ("max over budget, measured (bytes, goal 0)", str(tier["max_over_budget_measured"])),
        ("max over budget, ledger (bytes, goal 0)", str(tier["max_over_budget_ledger"])),
    ]
    for name, value in rows:
        print(f"{name:<40}{value:>24}")
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="evict-and-reload rounds")
    parser.add_argument(
        "--rows", type=int, default=8, help="full-context prompts before the offload"
    )
    parser.add_argument(
        "--swap-s", type=float, default=30.0, help="seconds of the three-model swap load"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(main(parse())))
