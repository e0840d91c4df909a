"""The request log through the real app: what each inference request leaves in the
database, what other requests do not, the usage view and ``routerctl usage``."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd import ctl
from routerd.api.keys import SERVICES
from routerd.app import build_app
from routerd.config import RequestLogConfig
from routerd.reload import reload_config
from routerd.services import Services
from state import RequestEntry
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec

CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    models = [
        fake_spec(tmp_path, "echo"),
        fake_spec(tmp_path, "embedder", task="embed"),
        fake_spec(tmp_path, "broken", fail_load="no weights in folder"),
    ]
    app = build_app(fake_services(tmp_path, backend, models))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as test_client:
        yield test_client


def services_of(client: TestClient) -> Services:
    return client.app[SERVICES]


def logged(client: TestClient) -> list[RequestEntry]:
    """Every row, once what is buffered is written (the flusher's work, done now)."""
    services = services_of(client)
    services.request_log.flush()
    return services.store.requests()


async def test_served_cold_and_warm_requests_are_recorded(client: TestClient) -> None:
    cold = await client.post(CHAT, json={"model": "echo", **HELLO})
    assert cold.status == 200 and "x-routerd-cold-start-ms" in cold.headers
    usage = (await cold.json())["usage"]
    warm = await client.post(CHAT, json={"model": "echo@1", **HELLO})
    assert warm.status == 200 and "x-routerd-cold-start-ms" not in warm.headers
    vectors = await client.post("/v1/embeddings", json={"model": "embedder", "input": "abcd"})
    assert vectors.status == 200
    first, second, third = logged(client)
    assert (first.endpoint, first.model, first.version, first.status) == (CHAT, "echo", "1", 200)
    assert (first.prompt_tokens, first.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert first.completion_tokens == 3 and first.error is None and not first.stream_failed
    assert first.waited_ms is not None and first.waited_ms >= 0
    assert second.waited_ms is None  # its model was ready
    assert first.duration_ms >= first.waited_ms and second.duration_ms > 0
    assert first.tenant is None
    assert first.ts <= second.ts <= third.ts
    assert (third.endpoint, third.model_id, third.prompt_tokens) == (
        "/v1/embeddings",
        "embedder@1",
        4,
    )
    assert third.completion_tokens == 0


async def test_failures_are_recorded_with_their_status_and_code(
    client: TestClient, backend: FakeBackend
) -> None:
    unknown = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert unknown.status == 404
    bad = await client.post(CHAT, json={"model": "echo"})  # no messages
    assert bad.status == 400
    not_json = await client.post(CHAT, data=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status == 400
    failed_load = await client.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert failed_load.status == 503
    backend.generate_errors.append(RuntimeError("the model fell over"))
    stream = await client.post(CHAT, json={"model": "echo", "stream": True, **HELLO})
    assert stream.status == 200
    assert '"error"' in await stream.text()
    rows = logged(client)
    assert [(r.endpoint, r.model_id, r.status, r.error) for r in rows] == [
        ("/v1/completions", None, 404, "model_not_found"),
        (CHAT, None, 400, "invalid_request_error"),
        (CHAT, None, 400, "invalid_request_error"),
        ("/v1/completions", "broken@1", 503, "model_load_failed"),
        (CHAT, "echo@1", 200, "server_error"),
    ]
    assert [r.stream_failed for r in rows] == [False, False, False, False, True]
    assert all(r.prompt_tokens == r.completion_tokens == 0 for r in rows[:4])


async def test_health_metrics_admin_and_model_lists_are_not_recorded(
    client: TestClient,
) -> None:
    for path in ("/health", "/ready", "/metrics", "/v1/models", "/admin/status", "/openapi.json"):
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/v1/models/nope")).status == 404
    assert (await client.get("/v1/nothing-here")).status == 404
    assert (await client.get("/v1/completions")).status == 405
    assert logged(client) == []
    assert (await client.post(CHAT, json={"model": "echo", **HELLO})).status == 200
    assert len(logged(client)) == 1


@pytest.mark.usefixtures("restore_logging")  # a reload reconfigures logging
async def test_turned_off_it_records_nothing_and_a_reload_turns_it_on(
    tmp_path: Path, backend: FakeBackend
) -> None:
    services = fake_services(
        tmp_path,
        backend,
        [fake_spec(tmp_path, "echo")],
        request_log=RequestLogConfig(enabled=False),
    )
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert (await client.post(CHAT, json={"model": "echo", **HELLO})).status == 200
        assert logged(client) == []
        retention = RequestLogConfig(max_rows=1, max_age=60.0, flush_interval=0.5)
        new = replace(services.live.config, request_log=retention)
        outcome = reload_config(services, lambda: new)
        assert outcome.error is None and outcome.restart_needed == []
        assert services.request_log.config == retention
        for _ in range(2):
            assert (await client.post(CHAT, json={"model": "echo", **HELLO})).status == 200
        assert len(logged(client)) == 2
        assert services.request_log.prune() == 1  # the new retention: one row
        assert len(services.store.requests()) == 1


async def test_shutdown_writes_what_is_buffered(tmp_path: Path, backend: FakeBackend) -> None:
    services = fake_services(
        tmp_path,
        backend,
        [fake_spec(tmp_path, "echo")],
        request_log=RequestLogConfig(flush_interval=3600.0),  # no periodic write in the test
    )
    async with TestClient(TestServer(build_app(services))) as client:
        assert (await client.post(CHAT, json={"model": "echo", **HELLO})).status == 200
        assert services.request_log.pending == 1
    assert not services.store.is_open
    from state import Store

    reopened = Store.open(services.store.path)
    try:
        assert [r.model_id for r in reopened.requests()] == ["echo@1"]
    finally:
        reopened.close()


async def test_usage_over_the_admin_api(client: TestClient, backend: FakeBackend) -> None:
    for _ in range(2):
        assert (await client.post(CHAT, json={"model": "echo", **HELLO})).status == 200
    assert (await client.post(CHAT, json={"model": "broken", **HELLO})).status == 503
    assert (await client.post(CHAT, json={"model": "nope", **HELLO})).status == 404
    response = await client.get("/admin/requests/usage", params={"since": "1h"})
    assert response.status == 200
    body = await response.json()
    assert body["now"] - body["since"] == pytest.approx(3600.0)
    usage = {(u["model"], u["version"]): u for u in body["usage"]}
    assert list(usage) == [("broken", "1"), ("echo", "1"), (None, None)]
    echo = usage["echo", "1"]
    assert (echo["requests"], echo["errors"], echo["rejected"], echo["cold_starts"]) == (2, 0, 0, 1)
    assert echo["completion_tokens"] == 6 and echo["error_rate"] == 0.0
    assert echo["mean_waited_ms"] >= 0
    broken = usage["broken", "1"]
    assert (broken["requests"], broken["errors"], broken["error_rate"]) == (1, 1, 1.0)
    assert usage[None, None]["rejected"] == 1
    everything = await (await client.get("/admin/requests/usage")).json()
    assert everything["since"] is None and everything["usage"] == body["usage"]
    recent = await (await client.get("/admin/requests/usage?since=0s")).json()
    assert recent["usage"] == []  # nothing arrived after now


@pytest.mark.parametrize("since", ["yesterday", "-5m", "1 week", ""])
async def test_a_bad_since_is_a_400_naming_it(client: TestClient, since: str) -> None:
    response = await client.get("/admin/requests/usage", params={"since": since})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "since" and "since" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_routerctl_usage(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)
    url = str(client.make_url("")).rstrip("/")
    assert await asyncio.to_thread(ctl.main, ["usage", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "no requests in the last 24h"
    for _ in range(3):
        served = await client.post(CHAT, json={"model": "echo", **HELLO})
        assert served.status == 200
    prompt_tokens = (await served.json())["usage"]["prompt_tokens"]
    assert (await client.post(CHAT, json={"model": "broken", **HELLO})).status == 503
    assert (await client.post(CHAT, json={"model": "nope", **HELLO})).status == 404
    assert await asyncio.to_thread(ctl.main, ["usage", "--url", url, "--since", "2h"]) == 0
    title, header, *rows = capsys.readouterr().out.strip().splitlines()
    assert title == "5 requests in the last 2h"
    assert header.split() == [
        *("MODEL", "REQUESTS", "ERRORS", "ERROR", "RATE", "REJECTED"),
        *("TOKENS", "IN", "TOKENS", "OUT", "COLD", "STARTS", "MEAN", "WAIT"),
    ]
    cells = {row.split()[0]: row.split()[1:] for row in rows}
    assert cells["echo@1"][:5] == ["3", "0", "0.0%", "0", str(3 * prompt_tokens)]
    assert cells["echo@1"][5:7] == ["9", "1"]
    assert cells["broken@1"][:3] == ["1", "1", "100.0%"]
    assert cells["broken@1"][-1] == "-"  # a load that failed gave no lease: no wait recorded
    assert cells["(no"][1:4] == ["1", "0", "0.0%"]  # "(no model)", rejected
    assert await asyncio.to_thread(ctl.main, ["usage", "--url", url, "--since", "all"]) == 0
    assert capsys.readouterr().out.startswith("5 requests in the request log\n")
    assert await asyncio.to_thread(ctl.main, ["usage", "--url", url, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {u["model"] for u in result["usage"]} == {"echo", "broken", None}
    assert math.isclose(result["now"] - result["since"], 86400.0)
    assert await asyncio.to_thread(ctl.main, ["usage", "--url", url, "--since", "soon"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "since" in err and "HTTP 400" in err
