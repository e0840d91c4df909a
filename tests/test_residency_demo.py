"""LRU eviction with the real demo models under a CPU budget that holds two of three.

Phase one loads each demo LM alone, so its measured footprint is stored; phase two
reopens the same state with a budget between "the two largest" and "all three", and
drives the daemon over HTTP, checking residency with routerctl and the event log.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from routerd import ctl
from routerd.app import build_app, build_services
from routerd.config import Config, SchedulerConfig, ServerConfig
from routerd.devices import DeviceInventory
from state import VersionSpec
from tests.fakes import MEMINFO
from tests.support import LedgerWatch, serve_admin_socket

LMS = ("demo-small", "demo-medium", "demo-large")


def demo_config(state_dir: Path, demo_root: Path) -> Config:
    models = tuple(
        VersionSpec(name=n, version="1", backend="transformers", path=str(demo_root / n))
        for n in LMS
    )
    return Config(
        state_dir=state_dir,
        models=models,
        scheduler=SchedulerConfig(min_residency=0.0, eviction="lru"),  # its order is tested
        server=ServerConfig(model_roots=(demo_root,)),
    )


def inventory(tmp: Path, budget: int) -> DeviceInventory:
    meminfo = tmp / "meminfo"
    meminfo.write_text(MEMINFO)
    return DeviceInventory(None, meminfo=meminfo, cpu_budget=budget)


async def test_demo_models_evict_in_lru_order(demo_root, tmp_path):
    state_dir = tmp_path / "state"
    config = demo_config(state_dir, demo_root)

    first = build_services(config, devices=inventory(tmp_path, 4 * 1024**3))
    try:
        for name in LMS:
            await first.scheduler.load(first.router.resolve(name))
            await first.scheduler.evict(f"{name}@1")
        measured = {
            name: first.store.measured_footprint(name, "1", "cpu").measured_bytes for name in LMS
        }
    finally:
        await first.scheduler.close()
        first.store.close()
    small, medium, large = (measured[n] for n in LMS)
    budget = medium + large + small // 2  # any two fit, all three do not

    watch = LedgerWatch()
    services = build_services(config, devices=inventory(tmp_path, budget), on_change=watch)
    async with TestClient(TestServer(build_app(services), host="127.0.0.1")) as client:
        await serve_admin_socket(client)
        for name in ("demo-small", "demo-medium", "demo-large", "demo-small"):
            response = await client.post(
                "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}
            )
            assert response.status == 200, await response.text()
        status = json.loads(await asyncio.to_thread(_ctl_json, state_dir, "status"))
        events = json.loads(await asyncio.to_thread(_ctl_json, state_dir, "events"))["events"]
    resident = sorted(i["model"] for i in status["instances"])
    assert resident == ["demo-large", "demo-small"]
    assert all(i["measured_bytes"] == measured[i["model"]] for i in status["instances"])
    evictions = [
        (e["model"], e["reason"], e["trigger"]) for e in reversed(events) if e["kind"] == "evict"
    ]
    assert evictions[-2:] == [
        ("demo-small", "lru", "demo-large@1"),
        ("demo-medium", "lru", "demo-small@1"),
    ]
    assert watch.checks > 0 and watch.worst_over == 0
    cpu = next(d for d in status["devices"] if d["id"] == "cpu")
    assert cpu["routerd_bytes"] == small + large <= cpu["budget_bytes"]


def _ctl_json(state_dir: Path, command: str) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ctl.main(["--state-dir", str(state_dir), command, "--json"])
    assert code == 0
    return out.getvalue()


async def test_a_demo_model_comes_back_from_the_host_tier(demo_root, tmp_path):
    """Two real demo models that do not fit the CPU budget together, with a host tier
    that holds either's weights: the evicted one rests there and its next request is
    served from it (no read, no warm-up), with the same greedy answer as before."""
    state_dir = tmp_path / "state"
    pair = ("demo-small", "demo-medium")
    config = demo_config(state_dir, demo_root)
    first = build_services(config, devices=inventory(tmp_path, 4 * 1024**3))
    try:
        for name in pair:
            await first.scheduler.load(first.router.resolve(name))
            await first.scheduler.evict(f"{name}@1")
        stored = {n: first.store.measured_footprint(n, "1", "cpu") for n in pair}
    finally:
        await first.scheduler.close()
        first.store.close()
    small, medium = (stored[n].measured_bytes for n in pair)
    weights = max(stored[n].weights_bytes for n in pair)
    tiered = replace(config, devices=replace(config.devices, host_cache=2 * weights))
    watch = LedgerWatch()
    budget = medium + small // 2  # either fits, both do not
    services = build_services(tiered, devices=inventory(tmp_path, budget), on_change=watch)
    body = {"prompt": "hello there", "max_tokens": 4, "temperature": 0}
    async with TestClient(TestServer(build_app(services), host="127.0.0.1")) as client:
        answers = []
        for name in ("demo-small", "demo-medium", "demo-small"):
            response = await client.post("/v1/completions", json={**body, "model": name})
            assert response.status == 200, await response.text()
            answers.append((await response.json())["choices"][0]["text"])
        tier = services.scheduler.host_tier()
        events = list(reversed(services.store.events(limit=20)))
    assert answers[0] == answers[2]  # the same weights came back
    moves = [
        (e.kind, e.model, (e.detail or {}).get("source") or (e.detail or {}).get("tier"))
        for e in events
        if e.kind in ("load", "evict")
    ]
    assert moves[-5:] == [  # the first phase's loads and manual evictions before these
        ("load", "demo-small", "disk"),
        ("evict", "demo-small", "host"),
        ("load", "demo-medium", "disk"),
        ("evict", "demo-medium", "host"),
        ("load", "demo-small", "host"),
    ]
    assert tier.models == ("demo-medium@1",)
    assert tier.used_bytes == stored["demo-medium"].weights_bytes
    assert watch.checks > 0 and watch.worst_over == 0
