"""Reloading the config (what SIGHUP does): sync models, apply settings, reject bad files."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd.app import build_app
from routerd.config import Config, ConfigError, SchedulerConfig
from routerd.reload import reload_config
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, fake_services, fake_spec

pytestmark = pytest.mark.usefixtures("restore_logging")  # a reload reconfigures logging


async def test_reload_syncs_models_and_applies_settings(tmp_path: Path) -> None:
    backend = FakeBackend()
    a, b = fake_spec(tmp_path, "a"), fake_spec(tmp_path, "b")
    services = fake_services(tmp_path, backend, [a, b])
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        assert (await client.post("/v1/completions", json={"model": "a", "prompt": "x"})).ok
        assert (await client.post("/v1/completions", json={"model": "b", "prompt": "x"})).ok
        changed_a = replace(a, options={"bytes": 2000})
        c = fake_spec(tmp_path, "c")
        new = replace(
            services.live.config,
            models=(changed_a, c),
            scheduler=SchedulerConfig(max_queue=7, placement="first-fit", min_residency=0.0),
            pinned=frozenset({"c@1"}),
        )
        outcome = reload_config(services, lambda: new)
        assert (outcome.added, outcome.updated, outcome.removed) == (["c@1"], ["a@1"], ["b@1"])
        assert outcome.error is None and outcome.restart_needed == []
        assert services.scheduler.settings.max_queue == 7
        assert services.scheduler.placement.name == "first-fit"
        assert services.scheduler.is_pinned("c@1")
        assert services.live.config is new
        for _ in range(100):  # the changed and the removed version drain and leave
            if not services.scheduler.instances():
                break
            await asyncio.sleep(0.01)
        assert services.scheduler.instances() == []
        assert sorted(backend.unloads) == ["a@1", "b@1"]
        gone = await client.post("/v1/completions", json={"model": "b", "prompt": "x"})
        assert gone.status == 404
        served = await client.post("/v1/completions", json={"model": "a", "prompt": "x"})
        assert served.status == 200
        status = await (await client.get("/admin/status")).json()
        assert status["instances"][0]["bytes"] == 2000, "loaded again with the new options"
        events = await (await client.get("/admin/events", params={"model": "b"})).json()
        assert events["events"][0]["reason"] == "reload"
        why = await (await client.get("/admin/why/b@1")).json()
        assert "config reload changed or removed it" in why["explanation"]


async def test_an_invalid_config_is_rejected_and_the_old_one_kept(tmp_path: Path) -> None:
    backend = FakeBackend()
    services = fake_services(tmp_path, backend, [fake_spec(tmp_path, "a")])
    old = services.live.config
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:

        def broken() -> Config:
            raise ConfigError("routerd.toml: unknown key scheduler.colour")

        outcome = reload_config(services, broken)
        assert outcome.error is not None and "colour" in outcome.error
        bad_model = replace(fake_spec(tmp_path, "z"), options={"colour": "red"})
        outcome = reload_config(services, lambda: replace(old, models=(bad_model,)))
        assert outcome.error is not None and "colour" in outcome.error
        assert services.live.config is old
        assert (await client.post("/v1/completions", json={"model": "a", "prompt": "x"})).ok
        assert (await client.get("/v1/models/z")).status == 404


async def test_a_request_in_flight_survives_a_reload_that_changes_its_model(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    slow = fake_spec(tmp_path, "a", token_delay=0.01, context=4096)
    services = fake_services(tmp_path, backend, [slow])
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        body = {"model": "a", "prompt": "abc", "max_tokens": 40, "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status == 200
        await response.content.readline()  # streaming has begun
        changed = replace(slow, options={**slow.options, "bytes": 3000})
        outcome = reload_config(services, lambda: replace(services.live.config, models=(changed,)))
        assert outcome.updated == ["a@1"]
        text = (await response.read()).decode()
        assert text.rstrip().endswith("data: [DONE]")
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in text.split("\n")
            if line.startswith("data: {")
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length", "the stream ran to its end"
        for _ in range(200):
            if backend.unloads:
                break
            await asyncio.sleep(0.01)
        assert backend.unloads == ["a@1"], "unloaded once its request had finished"
