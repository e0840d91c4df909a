"""/metrics: every family observed from the real app (fake backend), scraped and parsed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from routerd.api.prometheus import METRICS
from routerd.app import build_app
from routerd.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, LOAD_BUCKETS, Metrics
from state import VersionRecord
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, fake_services, fake_spec


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(scraped: dict, name: str, **labels: str) -> float:
    """The one sample named ``name`` whose labels include ``labels`` (0 if none)."""
    matching = [v for (n, ls), v in scraped.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(matching) <= 1, f"{name} {labels} matches {len(matching)} samples"
    return matching[0] if matching else 0.0


async def scrape(client: TestClient) -> dict:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


async def test_requests_tokens_loads_and_evictions_are_counted(tmp_path: Path) -> None:
    backend = FakeBackend()
    specs = [fake_spec(tmp_path, "a", bytes=5000), fake_spec(tmp_path, "e", task="embed")]
    app = build_app(fake_services(tmp_path, backend, specs))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        body = {"model": "a", "prompt": "abcd", "max_tokens": 3}
        first = await client.post("/v1/completions", json=body)
        assert first.status == 200 and "x-routerd-cold-start-ms" in first.headers
        second = await client.post("/v1/completions", json={**body, "stream": True})
        assert second.status == 200
        await second.read()
        embedded = await client.post("/v1/embeddings", json={"model": "e", "input": "xy"})
        assert embedded.status == 200
        missing = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert missing.status == 404

        scraped = await scrape(client)
        endpoint = "/v1/completions"
        assert value(scraped, "routerd_requests_total", model="a", version="1",
                     endpoint=endpoint, status="200") == 2  # fmt: skip
        assert value(scraped, "routerd_requests_total", model="", endpoint=endpoint,
                     status="404") == 1  # fmt: skip
        assert value(scraped, "routerd_request_duration_seconds_count", model="a") == 2
        assert value(scraped, "routerd_time_to_first_token_seconds_count", model="a") == 1
        assert value(scraped, "routerd_prompt_tokens_total", model="a") == 8
        assert value(scraped, "routerd_generated_tokens_total", model="a") == 6
        assert value(scraped, "routerd_prompt_tokens_total", model="e") == 2
        assert value(scraped, "routerd_cold_starts_total", model="a") == 1
        assert value(scraped, "routerd_cold_starts_total", model="e") == 1
        assert value(scraped, "routerd_loads_total", model="a", result="ok") == 1
        assert value(scraped, "routerd_load_duration_seconds_count", model="a") == 1
        assert value(scraped, "routerd_batch_size_count", model="a") == 2
        assert value(scraped, "routerd_resident_instances", device="cpu", state="ready") == 2
        assert value(scraped, "routerd_footprint_measured_bytes", model="a") == 5000
        assert value(scraped, "routerd_footprint_estimated_bytes", model="a") == 5000
        assert value(scraped, "routerd_device_memory_bytes", device="cpu", kind="ours") == 6000
        assert value(scraped, "routerd_device_memory_bytes", device="cpu", kind="total") > 0

        evicted = await client.post("/admin/evict", json={"model": "a"})
        assert evicted.status == 200
        scraped = await scrape(client)
        assert value(scraped, "routerd_evictions_total", model="a", reason="manual") == 1
        assert value(scraped, "routerd_eviction_age_seconds_count", reason="manual") == 1
        assert value(scraped, "routerd_resident_instances", device="cpu", state="ready") == 1
        assert value(scraped, "routerd_footprint_measured_bytes", model="a") == 0  # gone


async def test_failed_loads_and_queue_depth(tmp_path: Path) -> None:
    backend = FakeBackend()
    specs = [fake_spec(tmp_path, "bad", fail_load="broken"), fake_spec(tmp_path, "slow")]
    app = build_app(fake_services(tmp_path, backend, specs))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        response = await client.post("/v1/completions", json={"model": "bad", "prompt": "x"})
        assert response.status == 503
        scraped = await scrape(client)
        assert value(scraped, "routerd_requests_total", model="bad", status="503") == 1
        backend.load_gate.clear()
        body = {"model": "slow", "prompt": "x"}
        tasks = [asyncio.ensure_future(client.post("/v1/completions", json=body)) for _ in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.01)
            scraped = await scrape(client)
            if value(scraped, "routerd_queue_depth", model="slow") == 3:
                break
        assert value(scraped, "routerd_queue_depth", model="slow") == 3
        backend.load_gate.set()
        assert [r.status for r in await asyncio.gather(*tasks)] == [200, 200, 200]
        scraped = await scrape(client)
        assert value(scraped, "routerd_loads_total", model="bad", result="failed") == 1
        assert value(scraped, "routerd_queue_depth", model="slow") == 0


async def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    one = build_app(fake_services(tmp_path / "1", FakeBackend(), [fake_spec(tmp_path / "1", "a")]))
    two = build_app(fake_services(tmp_path / "2", FakeBackend(), [fake_spec(tmp_path / "2", "a")]))
    assert one[METRICS].registry is not two[METRICS].registry
    async with TestClient(TestServer(one)) as c1, TestClient(TestServer(two)) as c2:
        assert (await c1.post("/v1/completions", json={"model": "a", "prompt": "x"})).status == 200
        first, second = await scrape(c1), await scrape(c2)
    assert value(first, "routerd_requests_total", model="a", status="200") == 1
    assert value(second, "routerd_requests_total", model="a", status="200") == 0


def test_children_are_prometheus_clients_own_made_once() -> None:
    metrics = Metrics()
    key = ("routerd_requests", "a", "1", "/v1/completions", "200")
    child = metrics.counters[key]
    assert metrics.counters[key] is child
    assert child is metrics.counters.metrics["routerd_requests"].labels(*key[1:])
    child.inc(2)
    scraped = samples(metrics.render().decode())
    assert value(scraped, "routerd_requests_total", model="a", status="200") == 2


def test_histograms_export_their_buckets() -> None:
    metrics = Metrics()
    histograms = {
        "routerd_request_duration_seconds": LATENCY_BUCKETS,
        "routerd_time_to_first_token_seconds": LATENCY_BUCKETS,
        "routerd_batch_size": BATCH_BUCKETS,
        "routerd_load_duration_seconds": LOAD_BUCKETS,
    }
    for name in histograms:
        metrics.histograms[name, "a", "x"].observe(3)
    scraped = samples(metrics.render().decode())
    for name, buckets in histograms.items():
        bounds = [dict(ls)["le"] for n, ls in scraped if n == f"{name}_bucket"]
        assert bounds == [repr(float(b)) for b in buckets] + ["+Inf"], name
        assert value(scraped, f"{name}_bucket", le="+Inf") == 1
        assert value(scraped, f"{name}_sum") == 3


def test_every_scheduler_event_is_counted() -> None:
    metrics = Metrics()
    record = VersionRecord("m", "2", "echo", "/x", {}, "api", 1.0, 1.0)
    metrics.event("load", record, {"duration_ms": 1500})
    metrics.event("load_failed", record, {})
    metrics.event("evict", record, {"reason": "ttl", "detail": {"resident_s": 30}})
    metrics.event("leak", record, {"device": "cuda:0"})
    metrics.batch(record, 5)
    scraped = samples(metrics.render().decode())
    assert value(scraped, "routerd_loads_total", model="m", version="2", result="ok") == 1
    assert value(scraped, "routerd_loads_total", model="m", result="failed") == 1
    assert value(scraped, "routerd_load_duration_seconds_sum", model="m", version="2") == 1.5
    assert value(scraped, "routerd_evictions_total", model="m", reason="ttl") == 1
    assert value(scraped, "routerd_eviction_age_seconds_sum", reason="ttl") == 30
    assert value(scraped, "routerd_leaks_total", device="cuda:0") == 1
    assert value(scraped, "routerd_batch_size_sum", model="m", version="2") == 5
