"""Embeddings on the vllm backend without an engine: the ``task``/``pooling`` options,
``VllmModel.embed_async`` over a hand-written engine, and the batcher's and the API's
path for models that pool in their own engine (``backends.base.AsyncEmbedding``).

The same path with a real engine is in tests/test_vllm_embeddings.py.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.base import AsyncEmbedding, LoadSpec
from backends.vllm import VllmBackend, VllmModel
from backends.vllm_plan import plan_load
from contract.errors import BackendError, InvalidRequest
from contract.generation import Generation, ModelInfo, SamplingParams, Task
from routerd.app import build_app
from routerd.serving.prompts import embedding_inputs
from tests.fakes import FakeBackend, FakeModel
from tests.support import fake_services, fake_spec

# -- options -----------------------------------------------------------------------


def test_task_and_pooling_options_are_checked() -> None:
    backend = VllmBackend()
    assert "task" not in backend.validate_options({})  # absent means auto
    chosen = backend.validate_options({"task": "embed", "pooling": "mean"})
    assert chosen["task"] == "embed" and chosen["pooling"] == "mean"
    assert backend.validate_options({"task": "generate"})["task"] == "generate"
    for options, param in (
        ({"task": "classify"}, "task"),
        ({"task": "embed", "pooling": "max"}, "pooling"),
        ({"pooling": "mean"}, "pooling"),  # pooling without task = "embed"
        ({"task": "generate", "pooling": "cls"}, "pooling"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            backend.validate_options(options)
        assert refused.value.param == param, options


# -- VllmModel over a hand-written engine -----------------------------------------


class _Vector:
    """What ``PoolingOutput.data`` offers the backend: ``float()`` and ``tolist()``."""

    def __init__(self, values: list[float]) -> None:
        self._values = values

    def float(self) -> _Vector:
        return self

    def tolist(self) -> list[float]:
        return list(self._values)


class _Output:
    def __init__(self, values: list[float]) -> None:
        self.outputs = type("PoolingOutput", (), {"data": _Vector(values)})()
        self.finished = True


class _PoolingEngine:
    """AsyncLLM's pooling surface: ``get_supported_tasks`` and ``encode``.

    Each request waits for ``gate``; a request cancelled while waiting is recorded as
    aborted, as vLLM aborts a request whose generator is cancelled.
    """

    def __init__(self, tasks: tuple[str, ...] = ("token_embed", "embed")) -> None:
        self.tasks = tasks
        self.requests: list[tuple[str, list[int], Any]] = []
        self.aborted: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return self.tasks

    async def encode(
        self, prompt: dict[str, list[int]], params: Any, request_id: str
    ) -> AsyncIterator[_Output]:
        ids = prompt["prompt_token_ids"]
        self.requests.append((request_id, ids, params))
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        yield _Output([float(len(ids)), float(sum(ids))])


def _model(demo_root: Path, engine: _PoolingEngine, task: Task) -> VllmModel:
    spec = LoadSpec("pool", "1", str(demo_root / "demo-embed"), {"task": "embed"}, device="cpu")
    info = ModelInfo(task=task, context_length=128, device="cpu", dtype="float32")
    plan = plan_load(spec)
    return VllmModel(engine, None, info, spec, plan, 0, set())


@pytest.fixture
def vllm_installed() -> None:
    pytest.importorskip("vllm", reason="VllmModel builds vLLM's PoolingParams")


@pytest.mark.usefixtures("vllm_installed")
async def test_embed_async_pools_each_input_as_its_own_engine_request(demo_root: Path) -> None:
    engine = _PoolingEngine()
    model = _model(demo_root, engine, Task.EMBED)
    assert isinstance(model, AsyncEmbedding)
    vectors = await model.embed_async([[5, 6, 7], [9], [5, 6, 7]])
    assert vectors == [[3.0, 18.0], [1.0, 9.0], [3.0, 18.0]]  # in input order
    assert [ids for _, ids, _ in engine.requests] == [[5, 6, 7], [9], [5, 6, 7]]
    assert len({rid for rid, _, _ in engine.requests}) == 3
    assert all(params.task == "embed" for _, _, params in engine.requests)


@pytest.mark.usefixtures("vllm_installed")
async def test_each_kind_of_model_refuses_the_other_kinds_requests(demo_root: Path) -> None:
    engine = _PoolingEngine()
    generating = _model(demo_root, engine, Task.GENERATE)
    with pytest.raises(InvalidRequest, match="generates text"):
        await generating.embed_async([[1, 2]])
    with pytest.raises(InvalidRequest, match="generates text"):
        generating.embed([[1, 2]])
    pooling = _model(demo_root, engine, Task.EMBED)
    with pytest.raises(InvalidRequest, match="embedding model"):
        await pooling.generate_async(Generation([1, 2], SamplingParams(max_tokens=2)))
    with pytest.raises(BackendError, match="embed_async"):
        pooling.embed([[1, 2]])  # its batches are vLLM's, never routerd's thread
    assert engine.requests == []


@pytest.mark.usefixtures("vllm_installed")
async def test_a_pooling_model_without_embeddings_is_refused_clearly(demo_root: Path) -> None:
    engine = _PoolingEngine(tasks=("classify",))
    model = _model(demo_root, engine, Task.EMBED)
    with pytest.raises(InvalidRequest, match="vLLM serves: classify") as refused:
        await model.embed_async([[1, 2]])
    assert refused.value.param == "model"
    assert engine.requests == []


@pytest.mark.usefixtures("vllm_installed")
async def test_cancelling_embed_async_aborts_every_engine_request(demo_root: Path) -> None:
    engine = _PoolingEngine()
    engine.gate.clear()
    model = _model(demo_root, engine, Task.EMBED)
    work = asyncio.ensure_future(model.embed_async([[1], [2], [3]]))
    for _ in range(100):
        if len(engine.requests) == 3:
            break
        await asyncio.sleep(0)
    assert len(engine.requests) == 3
    work.cancel()
    with pytest.raises(asyncio.CancelledError):
        await work
    assert sorted(engine.aborted) == sorted(rid for rid, _, _ in engine.requests)


# -- the batcher and the API with a model that pools in its engine ----------------


class _PoolingModel:
    """A FakeModel that embeds on the event loop, as a vLLM pooling model does."""

    def __init__(self, inner: FakeModel) -> None:
        self._inner = inner
        self.batches: list[list[list[int]]] = []
        self.failure: Exception | None = None

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    async def embed_async(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        await asyncio.sleep(0)
        if self.failure is not None:
            raise self.failure
        self.batches.append([list(ids) for ids in inputs])
        vectors = []
        for ids in inputs:
            raw = [float(len(ids)), float(sum(ids)), 1.0]
            norm = math.sqrt(sum(x * x for x in raw))
            vectors.append([x / norm for x in raw])
        return vectors


class _PoolingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.pooling: list[_PoolingModel] = []

    def load(self, spec: LoadSpec) -> _PoolingModel:  # type: ignore[override]
        model = _PoolingModel(super().load(spec))
        self.pooling.append(model)
        return model


async def test_batcher_tokenizes_on_the_thread_and_pools_in_the_engine(tmp_path: Path) -> None:
    backend = _PoolingBackend()
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "e", task="embed")])
    threads: list[str] = []

    def prepare(model: Any) -> list[list[int]]:
        threads.append(threading.current_thread().name)
        return embedding_inputs(["ab", "c"], model)

    try:
        async with services.scheduler.lease(services.router.resolve("e")) as lease:
            embedded = await lease.instance.batcher.embed(prepare, 3)
            assert embedded.token_ids == [[97, 98], [99]]
            assert len(embedded.vectors) == 2 and embedded.vectors[0] != embedded.vectors[1]
            assert backend.pooling[0].batches == [[[97, 98], [99]]]
            assert backend.embed_calls == 0  # the thread-side embed was never used
            assert lease.instance.batcher.batches == 0  # nor routerd's batch loop
            assert threads and threads[0] != threading.current_thread().name
    finally:
        await services.scheduler.close()
        services.store.close()


async def test_the_api_serves_and_refuses_through_the_async_pooling_path(tmp_path: Path) -> None:
    backend = _PoolingBackend()
    models = [fake_spec(tmp_path, "e", task="embed"), fake_spec(tmp_path, "g")]
    services = fake_services(tmp_path, backend, models)
    async with TestClient(TestServer(build_app(services))) as client:
        ok = await client.post("/v1/embeddings", json={"model": "e", "input": ["ab", "cde"]})
        assert ok.status == 200, await ok.text()
        body = await ok.json()
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
        assert ok.headers["x-routerd-model"] == "e@1"
        for path, payload in (
            ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ):
            refused = await client.post(path, json={"model": "e", **payload})
            assert refused.status == 400
            error = (await refused.json())["error"]
            assert error["param"] == "model" and path in error["message"]
            assert error["type"] == "invalid_request_error"
        # A request the engine refuses is the client's mistake: 400, nothing failed.
        pooling = backend.pooling[0]
        pooling.failure = InvalidRequest("an input is empty", param="input")
        for _ in range(services.live.config.scheduler.max_failures):  # enough to fail a backend
            bad = await client.post("/v1/embeddings", json={"model": "e", "input": "x"})
            assert bad.status == 400 and (await bad.json())["error"]["param"] == "input"
        pooling.failure = None
        instance = services.scheduler.instance("e@1")
        assert instance is not None and instance.state == "ready" and instance.in_flight == 0
        again = await client.post("/v1/embeddings", json={"model": "e", "input": "ab"})
        assert again.status == 200
        assert (await again.json())["data"][0]["embedding"] == body["data"][0]["embedding"]
    await services.scheduler.close()
    services.store.close()
