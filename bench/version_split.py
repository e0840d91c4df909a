"""Cost and quality of the weighted sticky split, against plain resolution, in one run.

Side by side over the same sticky keys, alternating rounds, best round kept:

- baseline: ``Router.route("m")`` for a model without a route (newest version: one
  dict lookup behind a method call), as every request paid before routes existed;
- split: ``Router.route("m", key)`` for a model routed 90/10 with a 20% shadow, as a
  request with ``x-routerd-sticky-key`` pays now.

Also measured: what the HTTP layer adds per request for traffic (``route_request``
and ``record_served`` on a mocked request, with the request's context made as the
middleware makes it: sticky key, shadow check, per-version stats), against the bare
``Router.resolve`` handlers used before; and, on 10,000 keys, how far each version's
share lands from its weight (points) and the share of keys that move when 90/10
becomes 75/25 (least possible: 15%).

Usage: python bench/version_split.py [--routes 200000] [--rounds 5]

Prints a human summary, then as its LAST line one JSON object: ``us_per_split``,
``baseline_us_per_route``, ``ratio``, ``http_layer_us`` (what the traffic code adds per
request), ``share_error_points``, ``moved_pct``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.registry import BackendRegistry
from policies.split import choose_version
from routerd.api.traffic import record_served, route_request
from routerd.app import build_app, build_services
from routerd.config import Config, ServerConfig
from routerd.request_context import RequestContext, StreamSlots, enter, leave
from routerd.router import Router
from state import RouteRecord, Shadow, VersionRecord, VersionSpec


async def http_layer_us(requests: int, rounds: int) -> float:
    """µs the traffic code adds to a request: routing + recording vs a bare resolve."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "m"
        folder.mkdir()
        config = Config(
            state_dir=Path(tmp) / "state",
            server=ServerConfig(model_roots=(Path(tmp),)),
            models=(VersionSpec("m", "1", "echo", str(folder), {}),),
        )
        services = build_services(config, backends=BackendRegistry())
        try:
            app = build_app(services)
            request = make_mocked_request("POST", "/v1/completions", app=app)
            response = web.Response()

            async def bare(r: web.Request) -> web.Response:
                services.router.resolve("m")
                return response

            slots = StreamSlots(limit=1)

            async def with_middleware(r: web.Request) -> web.StreamResponse:
                context = RequestContext(time.monotonic(), slots)
                token = enter(context)
                route_request(r, "m", "user-1", _no_shadow)
                record_served(services.stats, context, response.status)
                leave(token)
                return response

            best = {"bare": float("inf"), "routed": float("inf")}
            for _ in range(rounds):
                for name, handler in (("bare", bare), ("routed", with_middleware)):
                    started = time.perf_counter()
                    for _ in range(requests):
                        await handler(request)
                    elapsed = (time.perf_counter() - started) / requests * 1e6
                    best[name] = min(best[name], elapsed)
            return best["routed"] - best["bare"]
        finally:
            services.store.close()


async def _no_shadow(record: VersionRecord) -> None:
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    records = [
        VersionRecord(name, v, "echo", "/x", {}, "api", float(i), float(i))
        for name in ("m", "plain")
        for i, v in enumerate(("1", "2", "3"))
    ]
    router = Router(records, [RouteRecord("m", {"1": 90, "2": 10}, Shadow("3", 20.0))])
    keys = [f"user-{i}" for i in range(args.routes)]

    def timed(model: str, sticky: bool) -> float:
        route = router.route
        started = time.perf_counter()
        for key in keys:
            route(model, key if sticky else None)
        return (time.perf_counter() - started) / len(keys) * 1e6

    baseline = split = float("inf")
    for _ in range(args.rounds):
        baseline = min(baseline, timed("plain", False))
        split = min(split, timed("m", True))

    added = asyncio.run(http_layer_us(min(args.routes, 50_000), args.rounds))

    sample = keys[:10_000]
    rng = random.Random(0)
    counts = Counter(choose_version("m", [("1", 90), ("2", 10)], k, rng) for k in sample)
    error = max(
        abs(100 * counts["1"] / len(sample) - 90), abs(100 * counts["2"] / len(sample) - 10)
    )
    before = [choose_version("m", [("1", 90), ("2", 10)], k, rng) for k in sample]
    after = [choose_version("m", [("1", 75), ("2", 25)], k, rng) for k in sample]
    moved = 100 * sum(a != b for a, b in zip(before, after, strict=True)) / len(sample)

    print(
        f"sticky 90/10 split + 20% shadow: {split:.2f} µs per request; no route: "
        f"{baseline:.2f} µs ({split / baseline:.1f}×)  (Python {platform.python_version()})"
    )
    print(f"routing + per-version stats in the HTTP layer: +{added:.2f} µs per request")
    print(
        f"10,000 keys at 90/10: shares within {error:.2f} points; "
        f"90/10 → 75/25 moves {moved:.1f}% of keys (least possible 15%)"
    )
    print(
        json.dumps(
            {
                "us_per_split": round(split, 3),
                "baseline_us_per_route": round(baseline, 3),
                "ratio": round(split / baseline, 2),
                "http_layer_us": round(added, 3),
                "share_error_points": round(error, 3),
                "moved_pct": round(moved, 2),
                "routes": len(keys),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
