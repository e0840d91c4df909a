"""max_queue: a full queue answers 429 with a Retry-After from measured times."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd.app import build_app
from routerd.clock import VirtualClock
from routerd.config import ConfigError, _scheduler
from routerd.scheduler.admission import (
    MAX_RETRY_S,
    MIN_RETRY_S,
    QueueState,
    moving_average,
    retry_after,
)
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, fake_services, fake_spec, until


def test_retry_after_adds_the_rest_of_the_load_and_the_queue_ahead() -> None:
    state = QueueState(waiting=10, service_s=2.0, concurrent=4, load_s=30.0, loading_for_s=12.0)
    assert retry_after(state) == pytest.approx(18.0 + 10 * 2.0 / 4)
    ready = QueueState(waiting=10, service_s=2.0, concurrent=4)
    assert retry_after(ready) == pytest.approx(5.0)
    assert retry_after(QueueState(waiting=1, service_s=0.01, concurrent=8)) == MIN_RETRY_S
    assert retry_after(QueueState(waiting=10**6, service_s=5.0, concurrent=1)) == MAX_RETRY_S
    # A first load not measured yet: only what is known counts.
    first = QueueState(waiting=3, service_s=None, concurrent=0, load_s=None, loading_for_s=0.5)
    assert retry_after(first) == MIN_RETRY_S


def test_moving_average_starts_at_the_first_sample() -> None:
    assert moving_average(None, 4.0) == 4.0
    assert moving_average(4.0, 9.0) == pytest.approx(5.0)


def test_max_queue_config() -> None:
    assert _scheduler({"max_queue": 3}).max_queue == 3
    assert _scheduler({}).max_queue == 256
    with pytest.raises(ConfigError, match="max_queue"):
        _scheduler({"max_queue": -1})


async def test_full_queue_is_429_with_retry_after_and_loses_nothing(tmp_path: Path) -> None:
    backend = FakeBackend()
    spec = fake_spec(tmp_path, "a", max_queue=2)
    services = fake_services(tmp_path, backend, [spec], clock=VirtualClock())
    app = build_app(services)
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        body = {"model": "a", "prompt": "ab", "max_tokens": 2}
        waiting = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in "12"]
        await until(services.scheduler, lambda: services.scheduler.queue_depths() == {"a@1": 2})
        await backend.began(backend.loads, 1)  # the one load they share is under way
        status = await (await client.get("/admin/status")).json()
        assert status["instances"][0]["state"] == "loading"
        refused = await client.post("/v1/completions", json=body)
        assert refused.status == 429
        error = (await refused.json())["error"]
        assert error["code"] == "queue_full" and "max_queue 2" in error["message"]
        assert int(refused.headers["Retry-After"]) >= 1
        backend.load_gate.set()
        assert [r.status for r in await asyncio.gather(*waiting)] == [200, 200]
        again = await client.post("/v1/completions", json=body)
        assert again.status == 200, "the queue drained: requests are taken again"


async def test_scheduler_max_queue_setting_and_option_validation(tmp_path: Path) -> None:
    backend = FakeBackend()
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "a")], scheduler={"max_queue": 1},
        clock=VirtualClock(),
    )  # fmt: skip
    app = build_app(services)
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        body = {"model": "a", "prompt": "ab", "max_tokens": 2}
        first = asyncio.ensure_future(client.post("/v1/completions", json=body))
        await until(services.scheduler, lambda: services.scheduler.queue_depths() == {"a@1": 1})
        await backend.began(backend.loads, 1)
        assert (await (await client.get("/admin/status")).json())["instances"]
        assert (await client.post("/v1/completions", json=body)).status == 429
        backend.load_gate.set()
        assert (await first).status == 200
        bad = {"name": "b", "backend": "fake", "path": str(tmp_path), "options": {"max_queue": -2}}
        response = await client.post("/admin/models", json=bad)
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "options.max_queue"
