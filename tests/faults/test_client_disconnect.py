"""A client that leaves mid-stream: its generation stops, its lease and stream slot return,
and the model's memory is released when it is evicted.

Served as ``routerd serve`` serves (an AppRunner without handler cancellation), so the
handler learns of the departure the way it does in production: a failed write.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from routerd.app import build_app
from routerd.config import ServerConfig
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec


async def test_leaving_mid_stream_stops_the_work_and_gives_everything_back(tmp_path):
    backend = FakeBackend()
    services = fake_services(
        tmp_path,
        backend,
        [fake_spec(tmp_path, "slow", token_delay=0.005, context=8192, bytes=5000)],
        server=ServerConfig(admin_token=ADMIN_TOKEN, max_streams=1),
    )
    runner = web.AppRunner(build_app(services))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    body = {"model": "slow", "prompt": "abc", "max_tokens": 4000, "stream": True}
    scheduler = services.scheduler
    try:
        async with aiohttp.ClientSession(headers=ADMIN_AUTH) as session:
            response = await session.post(base + "/v1/completions", json=body)
            assert response.status == 200
            await response.content.readline()
            response.close()  # the client goes away after the first piece
            left_at = time.monotonic()
            async with asyncio.timeout(5):
                while scheduler.instance("slow@1").in_flight:
                    await asyncio.sleep(0.01)
            # 4000 tokens would take 20 s; the row stopped within the next few steps
            assert backend.generated == 1 and time.monotonic() - left_at < 5
            # the stream slot came back (max_streams = 1) and the thread is free again
            async with session.post(
                base + "/v1/completions", json={**body, "max_tokens": 3}
            ) as again:
                assert again.status == 200
                assert (await again.text()).rstrip().endswith("data: [DONE]")
            async with session.post(base + "/admin/evict", json={"model": "slow"}) as evicted:
                assert evicted.status == 200
            async with session.get(base + "/admin/status") as status_response:
                status = await status_response.json()
        cpu = next(d for d in status["devices"] if d["id"] == "cpu")
        assert status["instances"] == [] and cpu["routerd_bytes"] == 0
        assert backend.unloads == ["slow@1"] and backend.models[0].unloaded
    finally:
        await runner.cleanup()
