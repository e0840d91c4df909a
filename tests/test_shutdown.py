"""Graceful shutdown: in-flight requests finish, then models unload and the store closes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec


async def test_in_flight_stream_finishes_before_models_unload(tmp_path):
    backend = FakeBackend()
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "slow", token_delay=0.01, context=4096)]
    )
    runner = web.AppRunner(build_app(services), shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    body = {"model": "slow", "prompt": "abc", "max_tokens": 60, "stream": True}
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.status == 200
        await response.content.readline()  # the stream has begun
        stopping = asyncio.create_task(runner.cleanup())
        await asyncio.sleep(0.05)
        assert not services.live.accepting, "shutdown must stop readiness at once"
        assert backend.unloads == [], "no unload while a request is in flight"
        text = (await response.read()).decode()
    await stopping
    pieces = [line for line in text.split("\n") if line.startswith("data: ")]
    assert pieces[-1] == "data: [DONE]"
    assert json.loads(pieces[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    assert backend.unloads == ["slow@1"]
    assert not services.store.is_open
