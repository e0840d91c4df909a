"""GPU checks (``@pytest.mark.gpu``, skipped without NVML): NVML against torch, two vLLM
engines packed on one GPU inside the ledger, memory back after eviction, sleep and wake
timings, pinned host-to-device bandwidth. ``bench/gpu_check.sh`` runs them in one go."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contract.generation import Cancellation, Generation, SamplingParams
from routerd.app import build_services
from routerd.config import Config, SchedulerConfig
from routerd.devices import DeviceInventory, NvmlProbe
from routerd.services import Services
from state import VersionSpec

pytestmark = pytest.mark.gpu

KV = 512 << 20
OPTIONS: dict[str, Any] = {
    "device": "cuda:0",
    "kv_cache_bytes": KV,
    "max_context": 1024,
    "enable_sleep_mode": True,
}


def _probe() -> NvmlProbe:
    probe = NvmlProbe.open()
    assert probe is not None
    return probe


def test_nvml_agrees_with_torch() -> None:
    torch = pytest.importorskip("torch")
    probe = _probe()
    free, total = torch.cuda.mem_get_info(0)
    reading = probe.memory(0)
    assert abs(reading.total - total) <= total * 0.01
    assert abs(reading.free - free) <= total * 0.05
    before = probe.processes(0)
    block = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    torch.cuda.synchronize()
    grown = probe.processes(0).get(os.getpid(), 0) - before.get(os.getpid(), 0)
    assert grown >= 1 << 30
    del block
    torch.cuda.empty_cache()


def test_pinned_host_to_device_bandwidth() -> None:
    torch = pytest.importorskip("torch")
    host = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda:0")
    device.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(4):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    gbps = 4 * (1 << 30) / (time.perf_counter() - started) / 1e9
    print(f"\npinned host-to-device copy: {gbps:.1f} GB/s")
    assert gbps > 2.0


@pytest.fixture(scope="module")
async def gpu_daemon(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Services]:
    from backends.vllm import use_state_dir

    tmp = tmp_path_factory.mktemp("gpu-vllm")
    use_state_dir(tmp / "state")
    models = tuple(
        VersionSpec(n, "1", "vllm", str(demo_root / n), options=dict(OPTIONS))
        for n in ("demo-small", "demo-medium")
    )
    config = Config(
        state_dir=tmp / "state", models=models, scheduler=SchedulerConfig(min_residency=0.0)
    )
    services = build_services(config, devices=DeviceInventory(_probe(), cpu_budget=0))
    yield services
    await services.scheduler.close()
    services.store.close()


async def _generate(services: Services, name: str) -> str:
    record = services.router.resolve(name)
    async with services.scheduler.lease(record) as lease:
        model = lease.instance.model
        result = await lease.instance.batcher.generate(
            Generation(
                model.encode_prompt("hello"),
                SamplingParams(max_tokens=8, temperature=0),
                None,
                Cancellation(),
            ),
        )
    return result.text


async def test_two_engines_share_one_gpu_within_the_ledger(gpu_daemon: Services) -> None:
    texts = await asyncio.gather(*(_generate(gpu_daemon, n) for n in ("demo-small", "demo-medium")))
    assert all(isinstance(t, str) for t in texts)
    instances = gpu_daemon.scheduler.instances()
    assert sorted(i.model for i in instances) == ["demo-medium", "demo-small"]
    assert all(i.device == "cuda:0" and i.measured_bytes for i in instances)
    row = next(r for r in gpu_daemon.scheduler.ledger() if r.device == "cuda:0")
    # The engines' own processes are ours, not foreign, and fit the capacity.
    assert row.used <= row.capacity
    assert row.foreign < KV
    for i in instances:
        assert i.measured_bytes is not None and i.measured_bytes >= KV


async def test_sleep_and_wake_timings(gpu_daemon: Services) -> None:
    from backends.vllm import VllmModel

    probe = _probe()
    record = gpu_daemon.router.resolve("demo-medium")
    async with gpu_daemon.scheduler.lease(record) as lease:
        model = lease.instance.model
        assert isinstance(model, VllmModel) and model.can_sleep
        held = sum(b for p, b in probe.processes(0).items() if p in model.pids)
        started = time.perf_counter()
        await model.sleep()
        slept_s = time.perf_counter() - started
        asleep = sum(b for p, b in probe.processes(0).items() if p in model.pids)
        started = time.perf_counter()
        await model.wake_up()
        woke_s = time.perf_counter() - started
    print(f"\nsleep {slept_s * 1000:.0f} ms, wake {woke_s * 1000:.0f} ms; {held} → {asleep} bytes")
    assert asleep <= held - KV // 2  # the KV cache (and weights) left the GPU
    assert await _generate(gpu_daemon, "demo-medium") is not None


async def test_memory_back_after_eviction(gpu_daemon: Services) -> None:
    probe = _probe()
    await _generate(gpu_daemon, "demo-small")
    snapshot = gpu_daemon.scheduler.instance("demo-small@1")
    assert snapshot is not None and snapshot.measured_bytes
    before = probe.memory(0).used
    await gpu_daemon.scheduler.evict("demo-small@1")
    freed = before - probe.memory(0).used
    assert freed >= snapshot.measured_bytes * 0.9
    assert not gpu_daemon.scheduler.leaks()
