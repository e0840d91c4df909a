"""Memory truth: does the daemon's real memory stay within what its ledger accounts?

routerd (``routerd serve --demo`` as a subprocess, loopback, a temporary state dir, a
CPU budget of ``--budget``) serves, with its resident memory (the process and its
children, from ``/proc``) sampled every ``--sample-ms`` (10) milliseconds against the
ledger's accounted bytes (``/admin/status``: the CPU device's instances plus
reservations), both taken relative to the daemon's level once it serves, before any
model is loaded:

1. demo-large under the default batching settings: ``--rows`` (8) and then
   ``--more-rows`` (32) concurrent long completions (``--prompt-tokens`` 1800 random
   token ids and up to ``--max-tokens`` 200: 2000 tokens, near the 2048 context);
2. a mixed swap load over demo-small, demo-medium and demo-large (``--mixed``
   requests, 8 at a time, the model in demand changing every few requests).

``--baseline REV`` runs the same phases on a checkout of an earlier commit first (a
temporary git worktree), so the two sides share the machine and the minute.

Prints a table, then as its last line one JSON object: ``peak_unaccounted_bytes``
(measured − accounted, at worst), ``peak_unaccounted_ratio`` (that, during phase 1,
÷ demo-large's accounted bytes; goal ≤ 0.05), ``peak_unaccounted_anonymous_bytes``
(the same, anonymous memory only), ``peak_over_budget_bytes`` (measured
over the budget, at worst; goal 0), ``tokens_per_s`` (phase 1), ``throughput_ratio``
(tokens/s ÷ the baseline's, with ``--baseline``; else absent), the same figures of
the baseline under ``baseline``, ``audit_violations`` (what the daemon's own strict
memory audit, ``ROUTERD_MEMORY_AUDIT=strict``, counted; null for a baseline without
one), and ``seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from servers import ROOT, free_port
from soak import Daemon

sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, the repository not
from backends import proctree

MIB = 1 << 20
LARGE = "demo-large"
MIXED_MODELS = ("demo-small", "demo-medium", "demo-large")


@dataclass
class Books:
    """The sampler's running worst cases, in bytes over the daemon's serving level."""

    samples: int = 0
    peak_measured: int = 0
    peak_unaccounted: int = 0
    peak_unaccounted_phase1: int = 0
    peak_unaccounted_anonymous: int = 0  # the same, counting anonymous memory only
    peak_over_budget: int = 0
    accounted: int = 0  # the ledger's latest figure
    phase: str = "idle"


@dataclass
class Side:
    name: str
    books: Books = field(default_factory=Books)
    large_accounted: int = 0
    tokens: int = 0
    phase1_s: float = 0.0
    evictions: int = 0
    errors: int = 0
    audit_violations: int | None = None  # the daemon's own strict memory audit, if it has one

    def figures(self) -> dict[str, Any]:
        large = max(self.large_accounted, 1)
        return {
            "peak_unaccounted_bytes": self.books.peak_unaccounted,
            "peak_unaccounted_ratio": round(self.books.peak_unaccounted_phase1 / large, 4),
            "peak_over_budget_bytes": self.books.peak_over_budget,
            "peak_unaccounted_anonymous_bytes": self.books.peak_unaccounted_anonymous,
            "peak_measured_bytes": self.books.peak_measured,
            "large_accounted_bytes": self.large_accounted,
            "tokens_per_s": round(self.tokens / self.phase1_s, 1) if self.phase1_s else 0.0,
            "evictions": self.evictions,
            "errors": self.errors,
            "audit_violations": self.audit_violations,
            "samples": self.books.samples,
        }


def tree_rss(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` and every process below it: all of them, and those
    not backed by a file (``statm``'s resident minus shared: anonymous memory)."""
    total = anonymous = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for member in (pid, *proctree.descendants(pid)):
        try:
            fields = Path(f"/proc/{member}/statm").read_text().split()
            resident, shared = int(fields[1]), int(fields[2])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        total += resident * page
        anonymous += (resident - shared) * page
    return total, anonymous


def accounted_bytes(status: dict[str, Any]) -> int:
    """What the ledger holds on the CPU device: instances plus reservations."""
    for device in status["devices"]:
        if device["id"] == "cpu":
            return int(device["routerd_bytes"]) + int(device["reserved_bytes"])
    return 0


async def watch(
    daemon: Daemon, side: Side, base: tuple[int, int], budget: int, sample_s: float
) -> None:
    """Sample RSS every ``sample_s`` and the ledger every fifth sample, until cancelled.

    The ledger is read before RSS within a round, so memory a load reserved is already
    on the books when its bytes appear."""
    books = side.books
    pid = daemon.server.process.pid
    tick = 0
    while True:
        if tick % 5 == 0:
            books.accounted = accounted_bytes(await daemon.call("GET", "/admin/status"))
        total, anonymous = tree_rss(pid)
        measured = total - base[0]
        books.peak_unaccounted_anonymous = max(
            books.peak_unaccounted_anonymous, anonymous - base[1] - books.accounted
        )
        books.samples += 1
        books.peak_measured = max(books.peak_measured, measured)
        unaccounted = measured - books.accounted
        books.peak_unaccounted = max(books.peak_unaccounted, unaccounted)
        if books.phase == "long":
            books.peak_unaccounted_phase1 = max(books.peak_unaccounted_phase1, unaccounted)
        books.peak_over_budget = max(books.peak_over_budget, measured - budget)
        tick += 1
        await asyncio.sleep(sample_s)


async def complete(
    session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], max_tokens: int
) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "seed": 1}
    async with session.post(url + "/v1/completions", json=body) as response:
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{model}: {response.status} {payload}")
        return int(payload["usage"]["completion_tokens"])


async def run_side(args: argparse.Namespace, side: Side, root: Path, work: Path) -> None:
    config = work / f"{side.name}.toml"
    config.write_text(
        f"""log_level = "warning"

[server]
request_timeout = "1h"

[scheduler]
min_residency = "0s"
load_wait_timeout = "120s"
keep_alive = "10m"

[devices]
cpu_memory = {args.budget * MIB}
poll_interval = "1s"
"""
    )
    state, log = work / f"state-{side.name}", work / f"{side.name}.log"
    daemon = Daemon(config, state, free_port(), log, root=root)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        watcher: asyncio.Task[None] | None = None
        try:
            await daemon.wait_ready(session)
            await asyncio.sleep(0.5)  # let start-up allocations settle
            base = tree_rss(daemon.server.process.pid)
            watcher = asyncio.create_task(
                watch(daemon, side, base, args.budget * MIB, args.sample_ms / 1000)
            )
            await daemon.call("POST", "/admin/load", {"model": LARGE})
            status = await daemon.call("GET", "/admin/status")
            side.large_accounted = next(
                int(i["bytes"]) for i in status["instances"] if i["model"] == LARGE
            )
            rng = random.Random(7)

            def prompt(length: int) -> list[int]:
                return [rng.randrange(5, 1000) for _ in range(length)]

            side.books.phase = "long"
            started = time.perf_counter()
            for rows in (args.rows, args.more_rows):
                done = await asyncio.gather(
                    *(
                        complete(
                            session, daemon.url, LARGE, prompt(args.prompt_tokens), args.max_tokens
                        )
                        for _ in range(rows)
                    )
                )
                side.tokens += sum(done)
            side.phase1_s = time.perf_counter() - started
            side.books.phase = "mixed"
            gate = asyncio.Semaphore(8)

            async def mixed(i: int) -> None:
                model = MIXED_MODELS[(i // 4) % len(MIXED_MODELS)]
                async with gate:
                    try:
                        await complete(
                            session, daemon.url, model, prompt(args.prompt_tokens // 4), 64
                        )
                    except RuntimeError:
                        side.errors += 1

            await asyncio.gather(*(mixed(i) for i in range(args.mixed)))
            events = (await daemon.call("GET", "/admin/events?limit=10000"))["events"]
            side.evictions = sum(e["kind"] == "evict" for e in events)
            audit = (await daemon.call("GET", "/admin/status")).get("memory_audit")
            if isinstance(audit, dict):
                side.audit_violations = int(audit["violations"])
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await daemon.stop()


def checkout(rev: str, work: Path) -> Path:
    """A worktree of ``rev`` under ``work`` (removed by ``drop_checkout``)."""
    path = work / "baseline"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return path


def drop_checkout(path: Path) -> None:
    subprocess.run(
        ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True
    )


def print_table(sides: list[Side]) -> None:
    rows = [
        ("peak measured (MiB)", "peak_measured_bytes", MIB),
        ("demo-large accounted (MiB)", "large_accounted_bytes", MIB),
        ("peak unaccounted (MiB)", "peak_unaccounted_bytes", MIB),
        ("peak unaccounted / demo-large", "peak_unaccounted_ratio", None),
        ("peak over budget (MiB)", "peak_over_budget_bytes", MIB),
        ("long requests, tokens/s", "tokens_per_s", None),
        ("evictions (mixed load)", "evictions", None),
        ("errors (mixed load)", "errors", None),
        ("daemon's strict audit: violations", "audit_violations", None),
    ]
    figures = [side.figures() for side in sides]
    print(f"{'':34}" + "".join(f"{side.name:>14}" for side in sides))
    for label, key, unit in rows:
        cells = [f[key] / unit if unit else f[key] for f in figures]
        print(
            f"{label:34}"
            + "".join(f"{c:>14.2f}" if isinstance(c, float) else f"{c!s:>14}" for c in cells)
        )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="routerd-memory-"))
    sides: list[Side] = []
    baseline_root: Path | None = None
    try:
        if args.baseline:
            baseline_root = checkout(args.baseline, work)
            sides.append(Side("baseline"))
            await run_side(args, sides[-1], baseline_root, work)
        sides.append(Side("routerd"))
        await run_side(args, sides[-1], ROOT, work)
    finally:
        if baseline_root is not None:
            drop_checkout(baseline_root)
        shutil.rmtree(work, ignore_errors=True)
    print_table(sides)
    result = sides[-1].figures()
    if len(sides) == 2:
        before = sides[0].figures()
        if before["tokens_per_s"]:
            result["throughput_ratio"] = round(result["tokens_per_s"] / before["tokens_per_s"], 3)
        result["baseline"] = before
    result["budget_bytes"] = args.budget * MIB
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--more-rows", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=1800)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--mixed", type=int, default=48, help="requests of the swap load")
    parser.add_argument("--budget", type=int, default=900, help="CPU budget, MiB")
    parser.add_argument("--sample-ms", type=float, default=10.0)
    parser.add_argument("--baseline", help="an earlier commit to run the same phases on first")
    return parser.parse_args(argv)


if __name__ == "__main__":
    outcome = asyncio.run(main(parse()))
    print(json.dumps(outcome))
    sys.exit(0)
