"""Request limits: the deadline (504, and the work stops), the stream cap (429), max_tokens."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd.api.keys import SERVICES
from routerd.app import build_app
from routerd.config import ServerConfig
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


def _app(tmp_path: Path, backend: FakeBackend, request_timeout: float):
    models = [
        fake_spec(tmp_path, "slow", token_delay=0.01, context=8192),
        fake_spec(tmp_path, "capped", context=4096, max_tokens=4),
        fake_spec(tmp_path, "quick"),
        fake_spec(tmp_path, "embedder", task="embed"),
    ]
    server = ServerConfig(admin_token=ADMIN_TOKEN, request_timeout=request_timeout, max_streams=1)
    return build_app(fake_services(tmp_path, backend, models, server=server))


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    """Requests have 0.4 s: enough for the fake models, not for 5000 slow tokens."""
    app = _app(tmp_path, backend, request_timeout=0.4)
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as test_client:
        yield test_client


@pytest.fixture
async def patient_client(tmp_path: Path, backend: FakeBackend):
    app = _app(tmp_path, backend, request_timeout=30)
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as test_client:
        yield test_client


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_request_past_its_deadline_is_504_and_its_work_stops(client, backend):
    started = asyncio.get_running_loop().time()
    response = await client.post(
        "/v1/completions", json={"model": "slow", "prompt": "abc", "max_tokens": 5000}
    )
    took = asyncio.get_running_loop().time() - started
    assert response.status == 504
    body = await response.json()
    assert body["error"]["code"] == "timeout" and "0.4s" in body["error"]["message"]
    assert took < 3, "answered at the deadline, not when 5000 tokens were done"
    scheduler = client.app[SERVICES].scheduler
    # the lease came back only after the row stopped: no thread still decodes for nobody
    assert scheduler.instance("slow@1").in_flight == 0
    assert backend.generated == 1, "the generation returned (cancelled) instead of running on"
    ok = await client.post("/v1/completions", json={"model": "quick", "prompt": "a"})
    assert ok.status == 200


async def test_a_stream_past_its_deadline_ends_with_an_error_event(client, backend):
    response = await client.post(
        "/v1/completions",
        json={"model": "slow", "prompt": "abc", "max_tokens": 5000, "stream": True},
    )
    assert response.status == 200
    text = await response.text()
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "timeout"
    assert len(events) > 3, "the stream had begun before the deadline"
    await _until(lambda: client.app[SERVICES].scheduler.instance("slow@1").in_flight == 0)
    assert backend.generated == 1
    services = client.app[SERVICES]
    (version,) = services.stats.snapshot()
    assert version["primary"]["errors"] == 1  # an error event in a stream is a failure
    services.request_log.flush()
    (row,) = services.store.requests()
    assert (row.status, row.error, row.stream_failed) == (200, "timeout", True)


async def test_streams_over_the_cap_get_429_with_retry_after(patient_client):
    client = patient_client
    first = await client.post(
        "/v1/completions",
        json={"model": "slow", "prompt": "abc", "max_tokens": 150, "stream": True},
    )
    assert first.status == 200
    await first.content.readline()  # the first stream is open
    second = await client.post(
        "/v1/chat/completions",
        json={"model": "quick", "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert second.status == 429
    assert second.headers["Retry-After"] == "1"
    assert (await second.json())["error"]["code"] == "too_many_streams"
    plain = await client.post("/v1/completions", json={"model": "quick", "prompt": "a"})
    assert plain.status == 200, "the cap is on streams only"
    await first.read()
    third = await client.post(
        "/v1/completions",
        json={"model": "quick", "prompt": "a", "max_tokens": 2, "stream": True},
    )
    assert third.status == 200, "the slot came back when the first stream ended"
    await third.read()


async def test_max_tokens_is_capped_per_model(client):
    over = await client.post(
        "/v1/completions", json={"model": "capped", "prompt": "abc", "max_tokens": 5}
    )
    assert over.status == 400
    body = await over.json()
    assert body["error"]["param"] == "max_tokens"
    assert body["error"]["code"] == "max_tokens_exceeded"
    unset = await client.post(
        "/v1/chat/completions",
        json={"model": "capped", "messages": [{"role": "user", "content": "hello there"}]},
    )
    assert unset.status == 200
    assert (await unset.json())["usage"]["completion_tokens"] == 4
    within = await client.post(
        "/v1/completions", json={"model": "capped", "prompt": "abc", "max_tokens": 3}
    )
    assert (await within.json())["usage"]["completion_tokens"] == 3


async def test_max_tokens_option_is_checked_at_registration(client, tmp_path):
    folder = tmp_path / "models" / "bad"
    folder.mkdir(parents=True)
    response = await client.post(
        "/admin/models",
        json={"name": "bad", "path": str(folder), "backend": "fake", "options": {"max_tokens": 0}},
    )
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "options.max_tokens"


async def test_an_embedding_whose_deadline_passed_in_the_queue_is_not_computed(client, backend):
    warm = await client.post("/v1/embeddings", json={"model": "embedder", "input": "a"})
    assert warm.status == 200
    backend.embed_gate.clear()
    backend.embed_calls = 0
    try:
        first = asyncio.create_task(
            client.post("/v1/embeddings", json={"model": "embedder", "input": "first"})
        )
        await _until(lambda: backend.embed_calls == 1)  # computing, held at the gate
        queued = await client.post("/v1/embeddings", json={"model": "embedder", "input": "x"})
        assert queued.status == 504
        assert (await first).status == 504
    finally:
        backend.embed_gate.set()
    ok = await client.post("/v1/embeddings", json={"model": "embedder", "input": "after"})
    assert ok.status == 200
    assert backend.embed_calls == 2, "the first batch and the last; never the timed-out queued one"
