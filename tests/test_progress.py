"""Load progress: backends report phases, /admin/status shows them, routerctl draws them,
and a stream waiting for a load receives SSE comments with the percentage."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from backends.base import MOVING_TO_DEVICE, READING_WEIGHTS, LoadProgress, LoadSpec
from backends.echo import EchoBackend
from routerd import ctl
from routerd.app import build_app
from routerd.config import ServerConfig
from routerd.ctl import format_ps, load_progress
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec


def admin(url: str) -> ctl.Target:
    """The test app's admin API over TCP, with the token fake_services configures."""
    return ctl.Target(url=url, token=ADMIN_TOKEN)


async def _until_drawn(out: io.StringIO, text: str) -> None:
    """Wait until routerctl (on its own thread, polling the admin API) has drawn ``text``."""
    async with asyncio.timeout(10):
        while text not in out.getvalue():
            await asyncio.sleep(0.01)


async def _until_loading(client: TestClient) -> dict:
    for _ in range(300):
        status = await (await client.get("/admin/status")).json()
        found = [i for i in status["instances"] if i.get("progress")]
        if found:
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no load in progress showed up in /admin/status")


async def test_status_shows_the_phase_and_routerctl_load_draws_it(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = build_app(fake_services(tmp_path, backend, [fake_spec(tmp_path, "a", bytes=4 << 20)]))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        url = str(client.make_url("")).rstrip("/")
        out = io.StringIO()
        loading = asyncio.ensure_future(
            asyncio.to_thread(ctl.load_with_progress, admin(url), {"model": "a"}, out)
        )
        instance = await _until_loading(client)
        assert instance["state"] == "loading"
        assert instance["progress"] == {
            "phase": READING_WEIGHTS,
            "done_bytes": 2 << 20,
            "total_bytes": 4 << 20,
        }
        assert instance["load_percent"] == 30  # half of the reading phase (0..60%)
        await _until_drawn(out, "loading a@1 on cpu: reading weights")
        backend.load_gate.set()
        result = await loading
    assert result["state"] == "ready" and result["model"] == "a"
    drawn = out.getvalue().splitlines()
    assert drawn[0] == "loading a@1 on cpu: reading weights 2.0 MiB / 4.0 MiB (30%)"
    assert len(drawn) == len(set(drawn)), "not a terminal: one line per phase, no repeats"


def test_progress_lines_and_ps_table() -> None:
    instances = [
        {"model": "big", "version": "2", "device": "cuda:0", "state": "loading",
         "progress": {"phase": MOVING_TO_DEVICE, "done_bytes": 1 << 30, "total_bytes": 2 << 30},
         "load_percent": 75, "bytes": 3 << 30, "in_flight": 0, "queued": 4},
        {"model": "small", "version": "1", "device": "cpu", "state": "ready", "progress": None,
         "load_percent": None, "bytes": 1 << 20, "in_flight": 2, "expires_at": None},
        {"model": "idle", "version": "1", "device": "cpu", "state": "ready", "bytes": 2048,
         "in_flight": 0, "expires_at": 1000.0 + 240, "pinned": False},
        {"model": "kept", "version": "1", "device": "cpu", "state": "ready", "bytes": 10,
         "in_flight": 0, "expires_at": None, "pinned": True},
    ]  # fmt: skip
    assert load_progress(instances, "big") == (
        MOVING_TO_DEVICE,
        "loading big@2 on cuda:0: moving to device 1.0 GiB / 2.0 GiB (75%)",
    )
    assert load_progress(instances, "big@3") is None
    assert load_progress(instances, "small") is None
    table = format_ps({"instances": instances}, now=1000.0).splitlines()
    assert table[0].split() == ["NAME", "DEVICE", "SIZE", "STATE", "IN", "FLIGHT", "UNTIL"]
    rows = {line.split()[0]: line for line in table[1:]}
    assert "loading 75%" in rows["big@2"] and "0 (+4 queued)" in rows["big@2"]
    assert "3.0 GiB" in rows["big@2"]
    assert rows["small@1"].endswith("while busy")
    assert rows["idle@1"].endswith("4 minutes from now") and "2.0 KiB" in rows["idle@1"]
    assert rows["kept@1"].endswith("pinned")
    assert format_ps({"instances": []}) == "no models loaded"


def test_human_durations() -> None:
    assert ctl.human_duration(0.25) == "250 ms"
    assert ctl.human_duration(12.34) == "12.3 s"
    assert ctl.human_duration(250) == "4m 10s"
    assert ctl.human_duration(7500) == "2h 5m"


def test_echo_backend_reports_its_phases(tmp_path: Path) -> None:
    seen: list[LoadProgress] = []
    spec = LoadSpec("e", "1", str(tmp_path), {"bytes": 100}, "cpu", progress=seen.append)
    EchoBackend().load(spec)
    assert [(p.phase, p.done_bytes, p.total_bytes) for p in seen] == [
        (READING_WEIGHTS, 0, 100),
        (READING_WEIGHTS, 100, 100),
        (MOVING_TO_DEVICE, 100, 100),
    ]


def test_transformers_backend_reports_bytes_read_and_moved(demo_root: Path) -> None:
    from backends.hf_transformers import TransformersBackend

    seen: list[LoadProgress] = []
    path = demo_root / "demo-small"
    spec = LoadSpec("demo-small", "1", str(path), {}, "cpu", progress=seen.append)
    model = TransformersBackend().load(spec)
    try:
        file_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        assert (seen[0].phase, seen[0].done_bytes, seen[0].total_bytes) == (
            READING_WEIGHTS, 0, file_bytes,
        )  # fmt: skip
        moves = [p for p in seen if p.phase == MOVING_TO_DEVICE]
        # On the CPU nothing moves: the phase is reported as it starts and as it ends.
        assert len(moves) >= 2, "the move phase starts and ends"
        assert [p.done_bytes for p in moves] == sorted(p.done_bytes for p in moves)
        assert moves[-1].done_bytes == moves[-1].total_bytes > 0
    finally:
        model.unload()


def _heartbeat_services(tmp_path: Path, backend: FakeBackend, **options: object):
    spec = fake_spec(tmp_path, "a", bytes=4000, **options)
    return fake_services(tmp_path, backend, [spec], server=ServerConfig(stream_heartbeat=0.05))


async def test_waiting_stream_gets_loading_comments_then_its_chunks(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = build_app(_heartbeat_services(tmp_path, backend))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        body = {"model": "a", "prompt": "abc", "max_tokens": 3, "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status == 200, "the stream began while the model was loading"
        assert response.headers["x-routerd-model"] == "a@1"
        first = await response.content.readline()
        assert first.decode().startswith(": loading a@1 ")
        await asyncio.sleep(0.2)
        backend.load_gate.set()
        text = (await response.read()).decode()
        scraped = await (await client.get("/metrics")).text()
    lines = [first.decode().rstrip("\n"), *text.split("\n")]
    comments = [line for line in lines if line.startswith(":")]
    assert ": loading a@1 30%" in comments, comments
    assert any(c.startswith(": served by a@1 on cpu after ") for c in comments)
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(d["choices"][0]["text"] for d in data) == "cba"
    assert lines[-3] == "data: [DONE]"
    assert 'routerd_cold_starts_total{model="a",version="1"} 1.0' in scraped


async def test_a_load_failing_after_comments_ends_the_stream_with_an_error(
    tmp_path: Path,
) -> None:
    backend = FakeBackend()
    app = build_app(_heartbeat_services(tmp_path, backend, fail_load="disk on fire"))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        body = {"model": "a", "prompt": "abc", "stream": True}
        response = await client.post("/v1/completions", json=body)
        await response.content.readline()
        backend.load_gate.set()
        text = (await response.read()).decode()
        assert (await client.get("/health")).status == 200
    events = [line for line in text.split("\n") if line.startswith("data: ")]
    error = json.loads(events[0][6:])["error"]
    assert error["code"] == "model_load_failed" and "disk on fire" in error["message"]
    assert events[-1] == "data: [DONE]"


async def test_a_quick_load_answers_as_before(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = build_app(_heartbeat_services(tmp_path, backend, fail_load="nope"))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        body = {"model": "a", "prompt": "abc", "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert response.status == 503, "failed before the first heartbeat: a plain error"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_routerctl_load_redraws_one_line_on_a_terminal(tmp_path: Path) -> None:
    backend = FakeBackend()
    app = build_app(fake_services(tmp_path, backend, [fake_spec(tmp_path, "a", bytes=1 << 20)]))
    async with TestClient(TestServer(app), headers=ADMIN_AUTH) as client:
        backend.load_gate.clear()
        url = str(client.make_url("")).rstrip("/")
        screen = _Terminal()
        loading = asyncio.ensure_future(
            asyncio.to_thread(ctl.load_with_progress, admin(url), {"model": "a@1"}, screen)
        )
        await _until_loading(client)
        await _until_drawn(screen, "loading a@1 on cpu: reading weights")
        backend.load_gate.set()
        await loading
    drawn = screen.getvalue()
    assert "\n" not in drawn, "redrawn in place"
    assert drawn.startswith("\r\033[Kloading a@1 on cpu: reading weights 512.0 KiB / 1.0 MiB")
    assert drawn.endswith("\r\033[K"), "the progress line is cleared before the result"
