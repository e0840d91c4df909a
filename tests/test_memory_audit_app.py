"""The memory audit in the daemon: started with the app, strict where asked, seen in
``/admin/status`` and ``/metrics``, and failing when a model holds memory its
footprint does not name. These read this test process's real memory (/proc)."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd.app import build_app
from routerd.clock import VirtualClock
from routerd.config import MemoryAuditConfig
from routerd.devices import DeviceInventory
from routerd.memory_audit import KEPT_VIOLATIONS, AuditSettings, MemoryAudit
from routerd.reload import reload_config
from tests.fakes import MEMINFO, FakeBackend, FakeGpus
from tests.support import (
    ADMIN_AUTH,
    STRICT_AUDITS,
    audit_failures,
    fake_services,
    fake_spec,
)
from tests.test_memory_audit import FakeLedger, FakeReader, row
from tests.test_metrics import scrape, value

MiB = 1024**2
STRICT = MemoryAuditConfig(mode="strict")


async def test_strict_app_under_load_sees_nothing_beyond_the_ledger(tmp_path: Path):
    models = [
        fake_spec(tmp_path, "a", bytes=4 * MiB, context=256),
        fake_spec(tmp_path, "e", task="embed", bytes=2 * MiB),
    ]
    services = fake_services(tmp_path, FakeBackend(), models, memory_audit=STRICT)
    audit = services.audit
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert audit.running and audit.settings.interval == 0.01 and "cpu" in audit.baseline
        answers = await asyncio.gather(
            *(client.post("/v1/completions", json={"model": "a", "prompt": f"p{i}"})
              for i in range(24)),
            *(client.post("/v1/embeddings", json={"model": "e", "input": ["x", "y"]})
              for _ in range(8)),
        )  # fmt: skip
        assert all(a.status == 200 for a in answers)
        [books] = await audit.sample()
        assert books.device == "cpu" and books.accounted == 6 * MiB and not books.over
        status = await (await client.get("/admin/status")).json()
        scraped = await scrape(client)
    assert audit.violations == [] and audit.samples >= 1
    report = status["memory_audit"]
    assert (report["mode"], report["violations"]) == ("strict", 0)
    assert report["devices"][0]["device"] == "cpu"
    assert ("routerd_memory_unaccounted_bytes", frozenset({("device", "cpu")})) in scraped
    assert not audit.running  # stopped with the app


async def test_a_model_holding_memory_it_did_not_account_is_a_violation(tmp_path: Path, caplog):
    """The fake model allocates 256 MiB for real and reports a footprint of 1 MiB."""
    models = [fake_spec(tmp_path, "hog", bytes=MiB, hold=256 * MiB)]
    services = fake_services(tmp_path, FakeBackend(), models, memory_audit=STRICT)
    audit = services.audit
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        with caplog.at_level(logging.ERROR, logger="routerd.memory_audit"):
            response = await client.post("/admin/load", json={"model": "hog"})
            assert response.status == 200
            [books] = await audit.sample()
        # Half the hold, not all of it: the test process's own heap (earlier tests'
        # garbage) may shrink below the baseline while the hog is loaded.
        assert books.over and books.unaccounted >= 128 * MiB and books.accounted == MiB
        assert books.unaccounted > books.allowance
        assert audit.violation_count >= 1 and audit.violations[0].books.device == "cpu"
        assert "use beyond the ledger on cpu" in caplog.text
        status = await (await client.get("/admin/status")).json()
        assert status["memory_audit"]["violations"] >= 1
        assert status["memory_audit"]["first_violations"][0]["accounted_bytes"] == MiB
        gauge = value(await scrape(client), "routerd_memory_unaccounted_bytes", device="cpu")
        assert gauge >= 128 * MiB and gauge > books.allowance  # as for the books above
        assert (await client.post("/admin/evict", json={"model": "hog"})).status == 200
        [after] = await audit.sample()  # the hog's bytes went with it
        assert not after.over


async def test_gpu_use_beyond_the_ledger_is_read_from_nvml(tmp_path: Path):
    """FakeGpus books each fake model's bytes as this process, as NVML would; bytes
    booked to us that no instance holds are unaccounted, those of another process not."""
    gpus = FakeGpus([8 * 1024 * MiB])
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(gpus, meminfo, cpu_budget=0)
    models = [fake_spec(tmp_path, "g", bytes=1024 * MiB, device="cuda:0")]
    services = fake_services(
        tmp_path, FakeBackend(gpus), models, devices=devices, memory_audit=STRICT
    )
    audit = services.audit
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert (await client.post("/admin/load", json={"model": "g"})).status == 200
        [books] = await audit.sample()
        assert (books.device, books.measured, books.accounted) == ("cuda:0", 1024 * MiB, 1024 * MiB)
        gpus.add(0, 2**22 + 7, 2048 * MiB)  # another process: foreign, not ours
        [books] = await audit.sample()
        assert not books.over and audit.violations == []
        gpus.add(0, os.getpid(), 512 * MiB)  # ours, and no instance accounts for it
        [books] = await audit.sample()
        assert books.over and books.unaccounted == 512 * MiB
        assert books.sources["nvml"] == 1536 * MiB
    assert audit.violation_count >= 1


async def test_by_default_the_audit_only_warns_and_sets_the_gauge(tmp_path: Path, caplog):
    models = [fake_spec(tmp_path, "hog", bytes=MiB, hold=160 * MiB)]
    services = fake_services(tmp_path, FakeBackend(), models, audit_clock=VirtualClock())
    audit = services.audit
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert (audit.settings.mode, audit.settings.interval) == ("on", 1.0)
        with caplog.at_level(logging.WARNING, logger="routerd.memory_audit"):
            assert (await client.post("/admin/load", json={"model": "hog"})).status == 200
            [books] = await audit.sample()
        assert books.over and audit.violations == [] and audit.violation_count == 0
        assert "memory in use beyond the ledger" in caplog.text
        assert value(await scrape(client), "routerd_memory_unaccounted_bytes") > 100 * MiB


async def test_off_exports_no_figure(tmp_path: Path):
    off = MemoryAuditConfig(mode="off")
    services = fake_services(tmp_path, FakeBackend(), [], memory_audit=off)
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert not services.audit.running
        status = await (await client.get("/admin/status")).json()
        scraped = await scrape(client)
    assert status["memory_audit"]["mode"] == "off" and status["memory_audit"]["samples"] == 0
    assert not [k for k in scraped if k[0] == "routerd_memory_unaccounted_bytes"]


# -- the strict_memory_audit fixture the batching tests use --------------------------


@pytest.mark.usefixtures("strict_memory_audit")
async def test_the_fixture_makes_services_audit_strictly_from_their_start(tmp_path: Path):
    if not STRICT_AUDITS.active:
        pytest.skip("--memory-audit off")
    services = fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "m")])
    assert services.audit.settings.strict and services.audit.running
    assert services.audit.settings.tolerance_bytes == 16 * MiB
    assert STRICT_AUDITS.audits == [services.audit]
    services.store.close()


async def test_the_fixture_check_reports_every_violation():
    """What ``strict_memory_audit`` fails a test with, on an audit over its ledger."""
    reader = FakeReader({"cpu": 0})
    settings = AuditSettings(mode="strict", tolerance_bytes=0)
    audit = MemoryAudit(FakeLedger(row()), reader, settings, clock=VirtualClock())
    audit.take_baseline()
    reader.usage["cpu"] = 300 * MiB
    for _ in range(KEPT_VIOLATIONS + 1):
        await audit.sample()
    failures = await audit_failures([audit])
    assert len(failures) == KEPT_VIOLATIONS + 1
    assert "unaccounted 314572800" in failures[0]
    assert failures[-1] == f"... {KEPT_VIOLATIONS + 1} violations in all"


def test_a_reload_leaves_the_audit_as_it_started(tmp_path: Path):
    """The baseline belongs to the start, so the mode and tolerance need a restart."""
    services = fake_services(tmp_path, FakeBackend(), [])
    try:
        new = replace(services.live.config, memory_audit=STRICT)
        outcome = reload_config(services, lambda: new)
        assert outcome.restart_needed == ["memory_audit"]
        assert services.audit.settings.mode == "on"
    finally:
        services.store.close()
