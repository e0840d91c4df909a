"""Soak: the demo models in a memory budget smaller than their sum, under mixed load.

routerd (``routerd serve --demo`` as a subprocess, loopback only, a temporary state
dir) first serves once with a generous budget so every demo model is loaded and its
footprint measured; then it is restarted with a CPU budget that holds all of them
but half of demo-medium, so demo-medium and demo-large cannot be resident together.
For ``--duration`` seconds (default 180; at most ``--max-requests``) ``--clients``
concurrent clients send completions, chat streams and embeddings. The language
model in demand alternates between demo-medium and demo-large every ``--phase``
seconds (shifting demand, as on a real host), so models are loaded and evicted
throughout; demo-small and demo-embed are used all along.

Every ``--poll`` seconds the admin socket's ``/admin/status`` is read to check the
memory ledger (``over_budget_bytes`` per device must stay 0). Both daemons run with
the memory audit strict (``--memory-audit``, default ``strict``: ``ROUTERD_MEMORY_AUDIT``),
which compares what the daemon really holds with the ledger every 10 ms; its
violations must stay 0 too. At the end the event log gives the loads and evictions,
and ``/proc`` the daemon's resident memory.

Usage: python bench/soak.py [--duration 180] [--clients 8] [--phase 20]
       [--max-requests 200000] [--poll 0.25] [--memory-audit strict|on|off]

Prints a table, then as its last line one JSON object: ``sent``, ``ok``,
``rejected_429``, ``errors_5xx``, ``errors_4xx``, ``lost`` (sent but never answered:
connection dropped or no answer within the client timeout), ``loads``,
``evictions``, ``failed_instances``, ``max_ledger_over_budget_bytes``,
``rss_start_mb``, ``rss_end_mb``, ``rss_ratio`` (end ÷ start), ``budget_bytes``,
``seconds``, ``audit_violations`` (both daemons), ``audit_samples``,
``max_unaccounted_bytes`` (per device, the audit's worst measured − baseline −
accounted; negative: never above the ledger). Goal: lost 0, errors_5xx 0, never over
budget, no audit violation, flat RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from servers import ROOT, ServerProcess, free_port

MODELS = ("demo-small", "demo-medium", "demo-large", "demo-embed")
START_TIMEOUT_S = 300.0  # the first start builds the demo models
REQUEST_TIMEOUT_S = 120.0  # an answer later than this counts as lost
EMBED_TEXTS = ["a cat", "a dog on a mat", "routerd packs models", "soak", "memory budget"]


class Daemon:
    """``routerd serve --demo`` on a loopback port with its state in ``state_dir``, and
    a client for its admin API on the unix socket there."""

    def __init__(
        self,
        config: Path,
        state_dir: Path,
        port: int,
        log: Path,
        audit: str = "strict",
        root: Path = ROOT,
    ) -> None:
        argv = [sys.executable, "-m", "routerd", "serve", "--demo", "--config", str(config)]
        argv += ["--state-dir", str(state_dir), "--port", str(port)]
        self.server = ServerProcess(
            "routerd",
            argv,
            port,
            log,
            start_timeout=START_TIMEOUT_S,
            poll_s=0.2,
            env={"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "ROUTERD_MEMORY_AUDIT": audit},
            append_log=True,  # the calibration run and the soak share one log
            root=root,
        )
        self.url = self.server.url
        self.admin = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(state_dir / "routerd.sock")),
            timeout=aiohttp.ClientTimeout(total=600),
        )

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        await self.server.wait_ready(session)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.admin.request(method, "http://routerd" + path, json=body) as response:
            payload = await response.json()
            if response.status >= 400:
                raise RuntimeError(f"{method} {path}: {response.status} {payload}")
            return payload

    def rss_mb(self) -> float:
        return self.server.status_mb("VmRSS:")

    def rss_peak_mb(self) -> float:
        return self.server.status_mb("VmHWM:")

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines)

    async def stop(self) -> None:
        await self.admin.close()
        await asyncio.to_thread(self.server.stop, 60)


def write_config(path: Path, budget: int | str) -> None:
    path.write_text(
        f"""log_level = "warning"

[scheduler]
min_residency = "1s"
load_wait_timeout = "60s"
keep_alive = "10m"

[devices]
cpu_memory = {json.dumps(budget)}
poll_interval = "1s"
"""
    )


async def calibrate(
    work: Path, session: aiohttp.ClientSession, audit: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """Load every demo model once with room to spare; return their measured bytes and
    the memory audit's status."""
    config = work / "calibrate.toml"
    write_config(config, "8GiB")
    daemon = Daemon(config, work / "state", free_port(), work / "routerd.log", audit)
    try:
        await daemon.wait_ready(session)
        for model in MODELS:
            await daemon.call("POST", "/admin/load", {"model": model})
        status = await daemon.call("GET", "/admin/status")
    finally:
        await daemon.stop()
    measured = {i["model"]: int(i["measured_bytes"]) for i in status["instances"]}
    return measured, status["memory_audit"]


@dataclass
class Counts:
    sent: int = 0
    ok: int = 0
    rejected_429: int = 0
    errors_5xx: int = 0
    errors_4xx: int = 0
    lost: int = 0
    completions: int = 0
    streams: int = 0
    embeddings: int = 0


def choose(rng: random.Random, hot: str) -> tuple[str, dict[str, Any]]:
    r = rng.random()
    if r < 0.75:
        model = hot if r < 0.5 else "demo-small"
        if rng.random() < 0.5:
            body = {"model": model, "prompt": "def main():", "max_tokens": 8}
            return "/v1/completions", body
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return "/v1/chat/completions", body
    inputs = rng.sample(EMBED_TEXTS, rng.randint(1, 4))
    return "/v1/embeddings", {"model": "demo-embed", "input": inputs}


async def send(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], counts: Counts
) -> float | None:
    """One request; returns a Retry-After to honour, if any."""
    counts.sent += 1
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S), session.post(url + path, json=body) as r:
            text = await r.text()
    except (TimeoutError, aiohttp.ClientError):
        counts.lost += 1
        return None
    if r.status == 429:
        counts.rejected_429 += 1
        return float(r.headers.get("Retry-After", "1"))
    if r.status >= 500:
        counts.errors_5xx += 1
        print(f"  {r.status} on {path} ({body['model']}): {text[:200]}", file=sys.stderr)
        return float(r.headers.get("Retry-After", "0"))
    if r.status >= 400:
        counts.errors_4xx += 1
        return None
    if body.get("stream"):
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any(_is_error(e) for e in events[:-1]):
            counts.errors_5xx += 1  # a stream that broke after its 200
            print(f"  broken stream ({body['model']}): {text[-200:]}", file=sys.stderr)
            return None
        counts.streams += 1
    elif path == "/v1/embeddings":
        counts.embeddings += 1
    else:
        counts.completions += 1
    counts.ok += 1
    return None


def _is_error(event: str) -> bool:
    """An ``error`` event: sent when a stream fails after its 200 went out."""
    try:
        return "error" in json.loads(event)
    except ValueError:
        return True


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="routerd-soak-"))
    timeout = aiohttp.ClientTimeout(total=None)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        try:
            measured, calibration_audit = await calibrate(work, session, args.memory_audit)
            budget = sum(measured.values()) - measured["demo-medium"] // 2
            config = work / "soak.toml"
            write_config(config, budget)
            log = work / "routerd.log"  # shared with the calibration run
            daemon = Daemon(config, work / "state", free_port(), log, args.memory_audit)
            try:
                await daemon.wait_ready(session)
                result = await drive(args, daemon, session, budget, measured)
                result["audit_violations"] += calibration_audit["violations"]
                result["audit_first_violations"][:0] = calibration_audit["first_violations"]
                return result
            finally:
                await daemon.stop()
        finally:
            if args.keep:
                print(f"kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)


async def drive(
    args: argparse.Namespace,
    daemon: Daemon,
    session: aiohttp.ClientSession,
    budget: int,
    measured: dict[str, int],
) -> dict[str, Any]:
    # Warm-up, not counted: every model served once, both language models loaded in
    # turn (so one eviction has happened), then the resident memory is the baseline.
    warm = Counts()
    for model in ("demo-small", "demo-large", "demo-medium", "demo-large"):
        await send(session, daemon.url, "/v1/completions", {"model": model, "prompt": "x"}, warm)
    await send(session, daemon.url, "/v1/embeddings", {"model": "demo-embed", "input": "x"}, warm)
    if warm.ok != warm.sent:
        raise RuntimeError(f"warm-up failed: {warm}\n{daemon.log_tail()}")
    rss_start = daemon.rss_mb()
    counts = Counts()
    started_wall = time.time()
    started = time.monotonic()
    deadline = started + args.duration
    max_over = 0
    polls = 0

    def hot_model() -> str:
        phase = int((time.monotonic() - started) / args.phase)
        return "demo-medium" if phase % 2 == 0 else "demo-large"

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline and counts.sent < args.max_requests:
            path, body = choose(rng, hot_model())
            pause = await send(session, daemon.url, path, body, counts)
            if pause:
                await asyncio.sleep(pause)

    async def poll() -> None:
        nonlocal max_over, polls
        while time.monotonic() < deadline:
            status = await daemon.call("GET", "/admin/status")
            polls += 1
            max_over = max([max_over, *(d["over_budget_bytes"] for d in status["devices"])])
            await asyncio.sleep(args.poll)

    poller = asyncio.create_task(poll())
    await asyncio.gather(*(client(1000 + i) for i in range(args.clients)))
    await poller
    seconds = time.monotonic() - started
    rss_end = daemon.rss_mb()
    rss_peak = daemon.rss_peak_mb()
    status = await daemon.call("GET", "/admin/status")
    max_over = max([max_over, *(d["over_budget_bytes"] for d in status["devices"])])
    audit = status["memory_audit"]
    events = (await daemon.call("GET", "/admin/events?limit=10000"))["events"]
    during = [e for e in events if e["ts"] >= started_wall]
    result = {
        **{k: v for k, v in asdict(counts).items()},
        "loads": sum(e["kind"] == "load" for e in during),
        "evictions": sum(e["kind"] == "evict" for e in during),
        "failed_instances": sum(e["kind"] == "failed" for e in during),
        "max_ledger_over_budget_bytes": max_over,
        "ledger_polls": polls,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_ratio": round(rss_end / rss_start, 3),
        "rss_peak_mb": round(rss_peak, 1),
        "budget_bytes": budget,
        "measured_bytes": measured,
        "seconds": round(seconds, 1),
        "clients": args.clients,
        "phase_s": args.phase,
        "audit_mode": audit["mode"],
        "audit_violations": audit["violations"],
        "audit_samples": audit["samples"],
        "max_unaccounted_bytes": {w["device"]: w["unaccounted_bytes"] for w in audit["worst"]},
        "audit_first_violations": audit["first_violations"],
    }
    return result


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("requests sent / ok", f"{result['sent']} / {result['ok']}"),
        ("completions / streams / embeddings",
         f"{result['completions']} / {result['streams']} / {result['embeddings']}"),
        ("429 / 4xx / 5xx / lost", f"{result['rejected_429']} / {result['errors_4xx']} / "
         f"{result['errors_5xx']} / {result['lost']}"),
        ("loads / evictions / failed", f"{result['loads']} / {result['evictions']} / "
         f"{result['failed_instances']}"),
        ("budget (bytes)", f"{result['budget_bytes']} (sum of models "
         f"{sum(result['measured_bytes'].values())})"),
        ("max over budget (bytes)", f"{result['max_ledger_over_budget_bytes']} "
         f"in {result['ledger_polls']} polls"),
        ("RSS start -> end (MiB)", f"{result['rss_start_mb']} -> {result['rss_end_mb']} "
         f"(ratio {result['rss_ratio']}, peak {result['rss_peak_mb']})"),
        ("memory audit violations / samples", f"{result['audit_violations']} / "
         f"{result['audit_samples']} ({result['audit_mode']})"),
        ("most unaccounted (bytes)", str(result["max_unaccounted_bytes"])),
        ("seconds", str(result["seconds"])),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--phase", type=float, default=20.0, help="seconds per hot LM")
    parser.add_argument("--max-requests", type=int, default=200_000, help="at most this many")
    parser.add_argument("--poll", type=float, default=0.25, help="ledger check interval (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state dir")
    parser.add_argument(
        "--memory-audit",
        choices=("strict", "on", "off"),
        default="strict",
        help="the daemons' memory audit mode (strict: a reading over the ledger is a violation)",
    )
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
