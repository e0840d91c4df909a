"""The parts of the vllm backend that need no engine: options, the KV grant, process
trees, the ledger's view of child processes, and the batcher's async path."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from backends import proctree, vllm_engine
from backends.base import AsyncGenerating, LoadSpec
from backends.vllm import VllmBackend, VllmModel
from backends.vllm_engine import kill
from backends.vllm_plan import plan_load
from contract.errors import BackendError, InvalidRequest
from contract.generation import (
    Cancellation,
    Generation,
    GenerationResult,
    ModelInfo,
    SamplingParams,
    Task,
)
from routerd.devices import DeviceReading
from routerd.memory import build_ledger
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec


def _spec(demo_root: Path, name: str = "demo-small", grant: int = 0, **options: object) -> LoadSpec:
    return LoadSpec(name, "1", str(demo_root / name), options, device="cpu", grant_bytes=grant)


def test_options_are_checked_and_defaulted() -> None:
    backend = VllmBackend()
    assert backend.validate_options({}) == {
        "dtype": "auto",
        "enforce_eager": True,
        "enable_sleep_mode": False,
    }
    with pytest.raises(InvalidRequest) as unknown:
        backend.validate_options({"gpu_memory_utilization": 0.9})
    assert unknown.value.param == "gpu_memory_utilization"
    with pytest.raises(InvalidRequest) as bad:
        backend.validate_options({"kv_cache_bytes": -1})
    assert bad.value.param == "kv_cache_bytes"


def test_estimate_is_weights_plus_wanted_kv_plus_overhead(demo_root: Path) -> None:
    backend = VllmBackend()
    estimate = backend.estimate_footprint(
        _spec(demo_root, max_context=512, max_num_seqs=4, overhead_bytes=1000)
    )
    # demo-small: 2 layers, 2 kv heads of 32 dims, fp32 → 1 KiB of K and V per token.
    assert estimate.runtime == 2 * 2 * 2 * 32 * 4 * 512 * 4
    assert 900_000 < estimate.weights < 1_200_000
    assert estimate.working == 1000


def test_kv_cache_fits_the_grant(demo_root: Path) -> None:
    plan = plan_load(_spec(demo_root, max_context=512, overhead_bytes=1000))
    assert plan.kv_for(0) == plan.kv_wanted
    roomy = plan.weights + plan.overhead + plan.kv_wanted * 2
    assert plan.kv_for(roomy) == plan.kv_wanted  # never more than asked for
    tight = plan.weights + plan.overhead + plan.kv_floor + 10
    assert plan.kv_for(tight) == plan.kv_floor + 10
    with pytest.raises(BackendError, match="granted"):
        plan.kv_for(plan.weights + plan.overhead + plan.kv_floor - 1)


def test_the_estimates_minimum_is_the_least_grant_a_start_accepts(demo_root: Path) -> None:
    spec = _spec(demo_root, max_context=512, overhead_bytes=1000)
    plan = plan_load(spec)
    estimate = VllmBackend().estimate_footprint(spec)
    assert estimate.minimum == plan.weights + 1000 + plan.kv_floor < estimate.total
    assert plan.kv_for(estimate.minimum) == plan.kv_floor
    with pytest.raises(BackendError, match="granted"):
        plan.kv_for(estimate.minimum - 1)


@pytest.mark.parametrize("kv_cache", ["wanted", "none"])
def test_a_measurement_learns_what_the_next_start_needs(demo_root: Path, kv_cache: str) -> None:
    # The "engine" is one small process: it holds far less than the planned overhead,
    # as a CPU engine may hold less than the default one. An encoder-only model
    # (kv_cache "none") keeps no KV cache, yet a start still asks room for one.
    spec = _spec(demo_root, max_context=512, overhead_bytes=1 << 30)
    plan = plan_load(spec)
    kv_bytes = plan.kv_wanted if kv_cache == "wanted" else 0
    info = ModelInfo(Task.GENERATE, plan.context_length, "cpu", plan.dtype)
    holding = "import time; held = b'x' * (64 << 20); print('held', flush=True); time.sleep(60)"
    with subprocess.Popen(
        [sys.executable, "-c", holding], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "held\n"
            engine = VllmModel(None, None, info, spec, plan, kv_bytes, {child.pid})
            measured = engine.measure_footprint()
        finally:
            child.kill()
    assert 0 < measured.working < plan.overhead  # what the process really holds
    with pytest.raises(BackendError, match="granted"):
        plan.kv_for(measured.total)  # issue 16: a grant of what was held is refused
    learned = measured.needed().total
    assert learned == plan.weights + plan.overhead + max(kv_bytes, plan.kv_floor)
    # Granted what was learned, the next start gets the KV cache this one had.
    assert plan.kv_for(learned) == max(kv_bytes, plan.kv_floor)


def test_a_grant_too_small_fails_before_any_process_starts(demo_root: Path) -> None:
    before = proctree.own_children()
    with pytest.raises(BackendError, match="KV cache"):
        VllmBackend().load(_spec(demo_root, grant=1 << 20))
    assert proctree.own_children() == before


def test_sleep_mode_is_refused_on_cpu(demo_root: Path) -> None:
    with pytest.raises(BackendError, match="sleep mode"):
        VllmBackend().estimate_footprint(_spec(demo_root, enable_sleep_mode=True))


def test_process_tree_descendants_rss_and_kill() -> None:
    # A child that starts a grandchild: both must be found, measured and killed.
    script = (
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 10
        while len(proctree.descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = {child.pid, *proctree.descendants(child.pid)}
        assert len(tree) == 2 and tree <= proctree.own_children()
        assert proctree.tree_rss_bytes([child.pid]) > proctree.rss_bytes(child.pid) > 1 << 20
        assert kill(tree) == set()
        assert not any(proctree.alive(p) for p in tree)
    finally:
        child.kill()
        child.wait()


class _FakeNvml:
    """The few pynvml calls the engine's measuring makes, over a fixed table of devices."""

    def __init__(
        self, totals: dict[int, int], processes: dict[int, list[tuple[int, int | None]]]
    ) -> None:
        self.totals = totals
        self.processes = processes
        self.open = 0  # nvmlInit calls not yet matched by nvmlShutdown
        self.asked: list[int] = []

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index not in self.totals:
            raise RuntimeError(f"no GPU {index}")
        self.asked.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=self.totals[handle])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.processes[handle]]


def test_gpu_bytes_are_read_per_engine_process_on_its_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = _FakeNvml(
        totals={0: 80 << 30, 1: 40 << 30},
        processes={0: [(11, 5 << 30)], 1: [(11, 1 << 30), (12, 2 << 30), (13, None), (99, 7)]},
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert vllm_engine.held_bytes(frozenset({11, 12, 13}), "cuda:1") == 3 << 30
    assert vllm_engine.held_bytes(frozenset({11}), "cuda") == 5 << 30  # "cuda" is GPU 0
    assert vllm_engine._gpu_total("cuda:1") == 40 << 30
    assert nvml.asked == [1, 0, 1] and nvml.open == 0
    with pytest.raises(RuntimeError, match="no GPU 3"):
        vllm_engine.held_bytes(frozenset({11}), "cuda:3")
    assert nvml.open == 0  # NVML is shut down again when a call fails


def test_ledger_counts_child_processes_as_ours() -> None:
    reading = DeviceReading(
        id="cuda:0",
        kind="cuda",
        name="gpu",
        total_bytes=100,
        used_bytes=60,
        free_bytes=40,
        process_bytes={1: 10, 2: 30, 3: 20},
    )
    plain = build_ledger([reading], [], headroom={}, our_pid=1)[0]
    with_children = build_ledger([reading], [], headroom={}, our_pid=1, our_children={2})[0]
    assert plain.foreign == 50
    assert with_children.foreign == 20


def test_cancel_calls_the_hook_once() -> None:
    calls: list[int] = []
    cancellation = Cancellation(on_cancel=lambda: calls.append(1))
    cancellation.cancel()
    cancellation.cancel()
    assert cancellation.cancelled and calls == [1]


class _AsyncModel:
    """A FakeModel that generates on the loop, as vLLM's does."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def generate_async(self, generation: Generation) -> GenerationResult:
        prompt_ids, params, on_text = generation.prompt_ids, generation.params, generation.on_text
        cancellation = generation.cancellation
        self.calls += 1
        text = ""
        for i in range(params.max_tokens):
            if cancellation.cancelled:
                return GenerationResult(text, len(prompt_ids), i, "cancelled")
            await asyncio.sleep(0)
            text += "a"
            if on_text is not None:
                on_text("a")
        return GenerationResult(text, len(prompt_ids), params.max_tokens, "length")


class _AsyncBackend(FakeBackend):
    def load(self, spec: LoadSpec) -> _AsyncModel:  # type: ignore[override]
        return _AsyncModel(super().load(spec))


async def test_batcher_hands_async_models_each_request_directly(tmp_path: Path) -> None:
    backend = _AsyncBackend()
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "a", bytes=1000)])
    record = services.router.resolve("a")
    try:
        async with services.scheduler.lease(record) as lease:
            model = lease.instance.model
            assert isinstance(model, AsyncGenerating)
            results = await asyncio.gather(
                *(
                    lease.instance.batcher.generate(
                        Generation([1, 2], SamplingParams(max_tokens=5), None, Cancellation())
                    )
                    for _ in range(3)
                )
            )
            assert [r.text for r in results] == ["aaaaa"] * 3
            assert isinstance(model, _AsyncModel) and model.calls == 3
            assert lease.instance.batcher.batches == 0  # no batch loop involved
    finally:
        await services.scheduler.close()
        services.store.close()


def test_state_dir_points_vllm_caches_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.vllm import use_state_dir

    for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH"):
        # Set first, so that monkeypatch records the old value (absent too) and restores
        # it: what use_state_dir sets must not reach later tests' engines.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    use_state_dir(tmp_path)
    for name in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH"):
        assert Path(os.environ[name]).is_dir()
        assert os.environ[name].startswith(str(tmp_path / "vllm"))
