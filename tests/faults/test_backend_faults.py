"""Backends that break: mid-batch, repeatedly, by crashing, by hanging, at load, out of memory.

Each test drives the real app (middlewares, handlers, scheduler, batcher) with a
FakeBackend told how to fail, and checks three things: the failing requests get a
clear error, nothing else is disturbed, and memory and leases come back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from contract.errors import BackendError, ModelCrashed
from routerd.api.keys import SERVICES
from routerd.app import build_app
from routerd.config import ServerConfig
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


async def _client(
    tmp_path: Path, backend: FakeBackend, *, request_timeout: float = 10.0
) -> TestClient:
    models = [
        # max_wait_ms 0: rows queued while a batch runs join it the moment it asks,
        # never left for a new batch by a 5 ms wait that a busy host may not have run out.
        fake_spec(tmp_path, "m", context=4096, max_wait_ms=0),
        fake_spec(tmp_path, "other"),
        fake_spec(tmp_path, "broken", fail_load="no weights in folder"),
        fake_spec(tmp_path, "oom-once", oom_loads=1, bytes=2000),
        fake_spec(tmp_path, "oom-always", oom_loads=9, bytes=2000),
    ]
    server = ServerConfig(admin_token=ADMIN_TOKEN, request_timeout=request_timeout)
    settings = {"max_failures": 3, "stop_timeout": 0.2, "release_timeout": 0.3}
    services = fake_services(tmp_path, backend, models, server=server, scheduler=settings)
    client = TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH)
    await client.start_server()
    return client


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    test_client = await _client(tmp_path, backend)
    yield test_client
    backend.generate_gate.set()
    await test_client.close()


async def _until(condition, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def complete(client: TestClient, model: str = "m", prompt: str = "ab", **extra: Any):
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, **extra})


async def _status(client: TestClient) -> dict[str, Any]:
    response = await client.get("/admin/status")
    assert response.status == 200
    result: dict[str, Any] = await response.json()
    return result


async def _events(client: TestClient, model: str) -> list[dict[str, Any]]:
    response = await client.get("/admin/events", params={"model": model})
    events: list[dict[str, Any]] = (await response.json())["events"]
    return events


def _cpu(status: dict[str, Any]) -> dict[str, Any]:
    return next(d for d in status["devices"] if d["id"] == "cpu")


async def test_backend_raising_mid_batch_fails_only_the_unfinished_rows(client, backend):
    assert (await complete(client)).status == 200  # loaded, batcher running
    batcher = client.app[SERVICES].scheduler.residency.instances["m@1"].batcher
    backend.generate_gate.clear()
    first = asyncio.create_task(complete(client, prompt="first"))
    await _until(lambda: len(backend.generate_threads) == 2)  # in generate, held at the gate
    # token arrays: strings would wait for the (held) model thread to tokenize them
    joining = [asyncio.create_task(complete(client, prompt=p)) for p in ([98], [99])]
    await _until(lambda: batcher.queued == 2)
    backend.batch_errors.append(BackendError("device fell over"))
    backend.generate_gate.set()  # first finishes; b and c join, then the batch raises
    answered = await asyncio.wait_for(asyncio.gather(first, *joining), timeout=5)
    assert [r.status for r in answered] == [200, 500, 500]
    for response in answered[1:]:
        body = await response.json()
        assert "device fell over" in body["error"]["message"]
        assert body["error"]["type"] == "server_error"
    assert (await complete(client, prompt="after")).status == 200
    status = await _status(client)
    assert status["failed"] == [], "one broken batch counts once, below max_failures"
    assert [i["state"] for i in status["instances"]] == ["ready"]


async def test_repeated_backend_errors_fail_the_instance_and_the_next_request_reloads_it(
    client, backend
):
    assert (await complete(client)).status == 200
    backend.generate_errors.extend(BackendError("CUDA error: launch failure") for _ in range(3))
    for _ in range(3):
        response = await complete(client)
        assert response.status == 500
        assert "launch failure" in (await response.json())["error"]["message"]
    await _until(lambda: backend.unloads == ["m@1"])
    status = await _status(client)
    assert [f["model"] for f in status["failed"]] == ["m"]
    assert status["failed"][0]["times"] == 1 and "launch failure" in status["failed"][0]["reason"]
    assert status["instances"] == []
    assert _cpu(status)["routerd_bytes"] == 0, "the failed instance's memory came back"
    kinds = [(e["kind"], e["reason"]) for e in await _events(client, "m")]
    assert kinds[0] == ("evict", "failed")
    assert kinds[1][0] == "failed" and "launch failure" in kinds[1][1]
    restarted = await complete(client)
    assert restarted.status == 200
    assert backend.loads.count("m@1") == 2
    assert (await complete(client, model="other")).status == 200


async def test_a_crashed_model_is_failed_at_once(client, backend):
    assert (await complete(client)).status == 200
    backend.generate_errors.append(ModelCrashed("device lost"))
    assert (await complete(client)).status == 500
    await _until(lambda: backend.unloads == ["m@1"])
    assert "device lost" in (await _status(client))["failed"][0]["reason"]
    assert (await complete(client)).status == 200


async def test_client_errors_do_not_count_against_the_backend(client, backend):
    assert (await complete(client)).status == 200
    for _ in range(5):
        response = await complete(client, prompt=[999])  # outside the vocabulary: 400
        assert response.status == 400
    assert (await _status(client))["failed"] == []
    assert backend.unloads == []


@pytest.fixture
async def impatient_client(tmp_path: Path, backend: FakeBackend):
    test_client = await _client(tmp_path, backend, request_timeout=0.5)
    yield test_client
    backend.generate_gate.set()
    await test_client.close()


async def test_a_hung_backend_is_answered_504_retired_and_replaced(impatient_client, backend):
    client = impatient_client
    assert (await complete(client)).status == 200
    backend.generate_gate.clear()  # the next generation hangs and ignores cancellation
    response = await complete(client, max_tokens=3)
    assert response.status == 504
    status = await _status(client)
    assert "did not stop" in status["failed"][0]["reason"]
    # the stuck thread still holds the model: its bytes stay counted, as a leak
    await _until(lambda: bool(client.app[SERVICES].scheduler.leaks()))
    status = await _status(client)
    assert [leak["model_id"] for leak in status["leaked"]] == ["m@1"]
    assert _cpu(status)["routerd_bytes"] == 1000
    backend.generate_gate.set()  # the thread comes back; its queued unload runs
    await _until(lambda: not client.app[SERVICES].scheduler.leaks())
    assert backend.unloads == ["m@1"]
    assert (await complete(client)).status == 200
    assert backend.loads.count("m@1") == 2


async def test_a_failing_load_leaves_the_host_as_it_was(client, backend):
    assert (await complete(client, model="other")).status == 200
    before = _cpu(await _status(client))
    response = await complete(client, model="broken")
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "model_load_failed"
    after = _cpu(await _status(client))
    assert after["routerd_bytes"] == before["routerd_bytes"]
    assert after["reserved_bytes"] == 0
    assert (await _events(client, "broken"))[0]["kind"] == "load_failed"
    assert (await complete(client, model="other")).status == 200


async def test_out_of_memory_at_load_is_retried_once_then_reported(client, backend):
    assert (await complete(client, model="oom-once")).status == 200
    assert backend.loads.count("oom-once@1") == 2
    response = await complete(client, model="oom-always")
    assert response.status == 503
    assert "out of memory" in (await response.json())["error"]["message"]
    assert backend.loads.count("oom-always@1") == 2, "one retry, not more"
    status = await _status(client)
    assert sorted(i["model"] for i in status["instances"]) == ["oom-once"]
    assert _cpu(status)["routerd_bytes"] == 2000 and _cpu(status)["reserved_bytes"] == 0


def test_failure_settings_come_from_the_config(tmp_path):
    from routerd.config import ConfigError, load_config
    from routerd.scheduler import SchedulerSettings

    path = tmp_path / "routerd.toml"
    path.write_text('[scheduler]\nmax_failures = 5\nstop_timeout = "2s"\n')
    config = load_config(path)
    settings = SchedulerSettings.from_config(config.scheduler, config.devices)
    assert (settings.max_failures, settings.stop_timeout) == (5, 2.0)
    for bad, message in [("max_failures = 0", "at least 1"), ('stop_timeout = "0s"', "positive")]:
        path.write_text(f"[scheduler]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
