"""Routes, shadows and rollouts through the real app, with echo models and a fake clock."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.registry import BackendRegistry
from policies.split import choose_version
from routerd import ctl
from routerd.app import build_app
from routerd.services import Services
from state import VersionSpec
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, FakeClock, fake_services

GIB = 1 << 30


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """routerctl --url sends $ROUTERD_ADMIN_TOKEN; the test apps accept ADMIN_TOKEN."""
    monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)


def echo(tmp: Path, version: str, name: str = "m", **options: Any) -> VersionSpec:
    folder = tmp / "models" / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    return VersionSpec(name, version, "echo", str(folder), options)


def build(tmp: Path, specs: Sequence[VersionSpec], clock: FakeClock) -> Services:
    services = fake_services(
        tmp, FakeBackend(), specs, backends=BackendRegistry(), wall_clock=clock
    )
    services.rollouts.tick_interval = 3600  # tests tick by hand, after moving the clock
    return services


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


async def serve(services: Services) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(services)), headers=ADMIN_AUTH) as client:
        yield client


async def routerctl(client: TestClient[Any, Any], capsys: Any, *args: str) -> tuple[int, str, str]:
    url = str(client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(ctl.main, ["--url", url, *args])
    out, err = capsys.readouterr()
    return code, out, err


async def complete(
    client: TestClient[Any, Any], model: str = "m", key: str | None = None, **body: Any
) -> tuple[int, str]:
    headers = {"x-routerd-sticky-key": key} if key is not None else {}
    response = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": "hi", "max_tokens": 2, **body},
        headers=headers,
    )
    await response.read()
    return response.status, response.headers.get("x-routerd-model", "")


def keys_for(version: str, weights: list[tuple[str, int]], count: int) -> list[str]:
    """Sticky keys that the split sends to ``version`` under ``weights``."""
    found = []
    i = 0
    while len(found) < count:
        key = f"k{i}"
        if choose_version("m", weights, key, random.Random()) == version:
            found.append(key)
        i += 1
    return found


# -- split and stickiness ---------------------------------------------------------------


async def test_split_is_sticky_and_every_response_names_its_version(
    tmp_path: Path, clock: FakeClock, capsys: Any
) -> None:
    services = build(tmp_path, [echo(tmp_path, "1"), echo(tmp_path, "2")], clock)
    async for client in serve(services):
        code, out, err = await routerctl(
            client, capsys, "route", "set", "m", "1=90", "2=10", "--json"
        )
        assert code == 0, err
        route = json.loads(out)
        assert route["explicit"] and route["primary"] == "m@1"
        assert [(v["version"], v["weight"], v["share"]) for v in route["versions"]] == [
            ("1", 90, 90.0),
            ("2", 10, 10.0),
        ]
        weights = [("1", 90), ("2", 10)]
        served = Counter()
        for i in range(200):
            key = f"user-{i}"
            status, model = await complete(client, key=key)
            assert status == 200
            assert model == f"m@{choose_version('m', weights, key, random.Random())}"
            served[model] += 1
        assert served["m@1"] > served["m@2"] > 0
        # The same key again: the same version, every time.
        again = {await complete(client, key="user-7") for _ in range(5)}
        assert len(again) == 1
        # Without the header, the OpenAI ``user`` field is the key.
        expected = choose_version("m", weights, "alice", random.Random())
        for _ in range(3):
            assert await complete(client, user="alice") == (200, f"m@{expected}")
        # name@version bypasses the route.
        assert await complete(client, model="m@2", key="user-1") == (200, "m@2")
        traffic = await (await client.get("/admin/traffic")).json()
        counts = {v["model"]: v["primary"]["requests"] for v in traffic["versions"]}
        assert counts["m@2"] == served["m@2"] + (3 if expected == "2" else 0) + 1
        status = await (await client.get("/admin/status")).json()
        assert {t["model"] for t in status["traffic"]} == {"m@1", "m@2"}
        code, out, err = await routerctl(client, capsys, "status")
        assert code == 0, err
        rows = [line.split() for line in out.splitlines() if line.startswith("m@2 ")]
        assert ["m@2", "primary", str(counts["m@2"]), "0", "0.0%"] in [r[:5] for r in rows]
        code, out, err = await routerctl(client, capsys, "route", "show", "m")
        assert code == 0, err
        assert "m (weights), primary m@1" in out
        assert out.splitlines()[2].split() == ["1", "90", "90%", "active", "ready"]
        code, out, err = await routerctl(client, capsys, "route", "history", "m")
        assert code == 0 and "1=90 2=10" in out and "manual" in out, err


async def test_bad_route_changes_are_clear_errors_and_change_nothing(
    tmp_path: Path, clock: FakeClock, capsys: Any
) -> None:
    services = build(tmp_path, [echo(tmp_path, "1")], clock)
    async for client in serve(services):
        for body, param in (
            ({"weights": {"9": 100}}, "version"),
            ({"weights": {"1": -5}}, "weights"),
            ({"weights": {"1": 0}}, "weights"),
            ({"weights": "1=100"}, "weights"),
        ):
            response = await client.put("/admin/routes/m", json=body)
            error = (await response.json())["error"]
            assert response.status in (400, 404), error
            assert error["param"] == param
        response = await client.put("/admin/routes/nope", json={"weights": {"1": 1}})
        assert response.status == 404
        code, _, err = await routerctl(client, capsys, "route", "set", "m", "1=ten")
        assert code == 1 and "must be an integer" in err
        assert not services.store.route("m").explicit
        assert await complete(client) == (200, "m@1")


# -- rolling update --------------------------------------------------------------------


async def test_route_change_loads_the_new_version_first_and_drains_the_old(
    tmp_path: Path, clock: FakeClock
) -> None:
    services = build(tmp_path, [echo(tmp_path, "1", latency_ms=400.0), echo(tmp_path, "2")], clock)
    async for client in serve(services):
        response = await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        assert response.status == 200
        in_flight = asyncio.ensure_future(complete(client))
        while (snap := services.scheduler.instance("m@1")) is None or not snap.in_flight:
            await asyncio.sleep(0.01)
        assert services.scheduler.instance("m@2") is None
        response = await client.put("/admin/routes/m", json={"weights": {"2": 100}})
        assert response.status == 200
        # Ready before any traffic moved to it; the old one still serves its request.
        new = services.scheduler.instance("m@2")
        assert new is not None and new.state == "ready"
        assert await complete(client) == (200, "m@2")
        assert await in_flight == (200, "m@1")
        await services.routes.wait_idle()
        assert services.scheduler.instance("m@1") is None
        evictions = [e for e in services.store.events(model="m") if e.kind == "evict"]
        assert [(e.version, e.reason) for e in evictions] == [("1", "retired")]
        why = await (await client.get("/admin/why/m@1")).json()
        assert "lost its traffic" in why["explanation"]
        why = await (await client.get("/admin/why/m@2")).json()
        assert "route change was about to send it traffic" in why["explanation"]
        assert {r.version: r.state for r in services.registry.versions()} == {
            "1": "retired",
            "2": "active",
        }


# -- shadow ------------------------------------------------------------------------------


async def test_failing_shadow_never_delays_or_fails_the_primary(
    tmp_path: Path, clock: FakeClock, capsys: Any
) -> None:
    specs = [
        echo(tmp_path, "1"),
        echo(tmp_path, "2"),
        echo(tmp_path, "3", fail_rate=1.0, latency_ms=500.0),
    ]
    services = build(tmp_path, specs, clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        code, out, err = await routerctl(
            client, capsys, "route", "shadow", "m", "3", "--percent", "100", "--json"
        )
        assert code == 0, err
        assert json.loads(out)["shadow"] == {"version": "3", "percent": 100.0}
        latencies = []
        for i in range(20):
            started = time.perf_counter()
            assert await complete(client, key=f"k{i}") == (200, "m@1")
            latencies.append(time.perf_counter() - started)
        # Each copy takes 500 ms on version 3 and then fails; the primary waited for none.
        assert max(latencies) < 0.5, latencies
        await services.shadows.wait_idle()
        snapshot = {v["model"]: v for v in services.stats.snapshot()}
        assert snapshot["m@1"]["primary"]["requests"] == 20
        assert snapshot["m@1"]["primary"]["errors"] == 0
        assert snapshot["m@3"]["shadow"]["requests"] == 20
        assert snapshot["m@3"]["shadow"]["errors"] == 20
        assert snapshot["m@3"]["shadow"]["window_p95_ms"] >= 500
        assert "primary" not in snapshot["m@3"]

        # 20 percent of requests are copied.
        services.routes.set_shadow("m", "2", 20)
        for i in range(300):
            assert await complete(client, key=f"j{i}") == (200, "m@1")
        await services.shadows.wait_idle()
        copies = services.stats.window("m@2", since=0, kind="shadow").requests
        assert 30 <= copies <= 90, copies
        code, out, err = await routerctl(client, capsys, "route", "shadow", "m", "--off")
        assert code == 0, err
        assert "shadow" not in out
        history = (await (await client.get("/admin/routes/m")).json())["history"]
        assert [h["shadow"] and h["shadow"]["version"] for h in history][:3] == [None, "2", "3"]


# -- rollouts ------------------------------------------------------------------------------


async def test_rollout_promotes_a_healthy_version(
    tmp_path: Path, clock: FakeClock, capsys: Any
) -> None:
    services = build(tmp_path, [echo(tmp_path, "1"), echo(tmp_path, "2")], clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        code, out, err = await routerctl(
            client, capsys, "rollout", "m", "--to", "2", "--steps", "50,100",
            "--interval", "60s", "--max-error-rate", "1%", "--max-p95-ratio", "1.5",
            "--min-requests", "10", "--json",
        )  # fmt: skip
        assert code == 0, err
        started = json.loads(out)
        assert (started["status"], started["step"], started["weight"]) == ("running", 1, 50)
        assert services.scheduler.instance("m@2") is not None  # loaded before traffic moved
        assert services.store.route("m").weights == {"1": 50, "2": 50}

        for i in range(60):
            assert (await complete(client, key=f"a{i}"))[0] == 200
        await services.rollouts.tick()
        assert services.store.route("m").weights == {"1": 50, "2": 50}  # interval not over
        clock.advance(61)
        await services.rollouts.tick()
        assert services.store.route("m").weights == {"1": 0, "2": 100}
        assert services.scheduler.instance("m@1") is not None  # kept warm until promotion

        for i in range(20):
            assert await complete(client, key=f"b{i}") == (200, "m@2")
        clock.advance(61)
        await services.rollouts.tick()
        code, out, err = await routerctl(client, capsys, "rollout", "status", "m", "--json")
        assert code == 0, err
        done = json.loads(out)
        assert done["status"] == "promoted"
        assert [s["action"] for s in done["log"]] == ["loaded", "step", "step", "promote"]
        assert done["log"][2]["detail"]["candidate"]["requests"] >= 10
        assert services.store.route("m").weights == {"2": 100}
        await services.routes.wait_idle()
        assert services.scheduler.instance("m@1") is None
        assert {r.version: r.state for r in services.registry.versions()} == {
            "1": "retired",
            "2": "active",
        }
        code, out, _ = await routerctl(client, capsys, "rollout", "status", "m")
        assert "promoted" in out and "healthy at 100%" in out


async def test_rollout_rolls_back_a_failing_version(tmp_path: Path, clock: FakeClock) -> None:
    services = build(tmp_path, [echo(tmp_path, "1"), echo(tmp_path, "2", fail_rate=1.0)], clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        response = await client.post(
            "/admin/rollouts",
            json={"model": "m", "to": "2", "steps": [10, 50, 100], "min_requests": 5},
        )
        assert response.status == 201, await response.text()
        for key in keys_for("2", [("2", 10), ("1", 90)], 5):
            assert await complete(client, key=key) == (500, "")
        for key in keys_for("1", [("2", 10), ("1", 90)], 20):
            assert await complete(client, key=key) == (200, "m@1")
        await services.rollouts.tick()  # no need to wait for the interval
        status = await (await client.get("/admin/rollouts/m")).json()
        assert status["status"] == "rolled_back"
        assert "error rate 100.0%" in status["reason"]
        assert [s["action"] for s in status["log"]] == ["loaded", "step", "rollback"]
        assert services.store.route("m").weights == {"1": 100}
        for i in range(10):
            assert await complete(client, key=f"c{i}") == (200, "m@1")
        await services.routes.wait_idle()
        assert services.scheduler.instance("m@2") is None
        assert {r.version: r.state for r in services.registry.versions()}["2"] == "retired"


async def test_rollout_fails_early_when_the_candidate_cannot_fit(
    tmp_path: Path, clock: FakeClock, capsys: Any
) -> None:
    specs = [echo(tmp_path, "1"), echo(tmp_path, "2", bytes=100 * GIB)]
    services = build(tmp_path, specs, clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        code, _, err = await routerctl(client, capsys, "rollout", "m", "--to", "2")
        assert code == 1
        assert "not started" in err and "HTTP 503" in err
        assert services.store.route("m").weights == {"1": 100}
        status = await (await client.get("/admin/rollouts/m")).json()
        assert status["status"] == "failed"
        assert [s["action"] for s in status["log"]] == ["load_failed"]
        assert await complete(client) == (200, "m@1")


async def test_rolling_out_the_newest_version_starts_from_the_one_before(
    tmp_path: Path, clock: FakeClock
) -> None:
    specs = [echo(tmp_path, "1"), echo(tmp_path, "2"), echo(tmp_path, "1", name="solo")]
    services = build(tmp_path, specs, clock)
    async for client in serve(services):
        # No route: the newest version (2) serves; a rollout to it starts from 1.
        response = await client.post(
            "/admin/rollouts", json={"model": "m", "to": "2", "steps": [10, 100]}
        )
        assert response.status == 201, await response.text()
        started = await response.json()
        assert (started["from"], started["to"], started["weight"]) == ("1", "2", 10)
        assert services.store.route("m").weights == {"1": 90, "2": 10}
        # A model with one version has nothing to roll out from.
        response = await client.post("/admin/rollouts", json={"model": "solo", "to": "1"})
        assert response.status == 409
        assert "nothing to roll out from" in (await response.json())["error"]["message"]


async def test_rollout_refusals(tmp_path: Path, clock: FakeClock) -> None:
    services = build(tmp_path, [echo(tmp_path, "1"), echo(tmp_path, "2")], clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        for body, status, param in (
            ({"model": "m", "to": "9"}, 404, "version"),
            ({"model": "m", "to": "2", "steps": [50, 20, 100]}, 400, "steps"),
            ({"model": "m", "to": "2", "max_error_rate": 5}, 400, "steps"),
            ({"model": "m"}, 400, "to"),
        ):
            response = await client.post("/admin/rollouts", json=body)
            assert response.status == status, await response.text()
            assert (await response.json())["error"]["param"] == param
        response = await client.post("/admin/rollouts", json={"model": "m", "to": "2"})
        assert response.status == 201
        response = await client.post("/admin/rollouts", json={"model": "m", "to": "2"})
        assert response.status == 409
        response = await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        assert response.status == 409  # hands off the route while a rollout drives it
        response = await client.post("/admin/rollouts/m/explode")
        assert response.status == 404


async def test_pause_resume_abort(tmp_path: Path, clock: FakeClock, capsys: Any) -> None:
    services = build(tmp_path, [echo(tmp_path, "1"), echo(tmp_path, "2")], clock)
    async for client in serve(services):
        await client.put("/admin/routes/m", json={"weights": {"1": 100}})
        args = ("--steps", "50,100", "--min-requests", "5")
        code, _, err = await routerctl(client, capsys, "rollout", "m", "--to", "2", *args)
        assert code == 0, err
        code, out, err = await routerctl(client, capsys, "rollout", "pause", "m", "--json")
        assert code == 0 and json.loads(out)["status"] == "paused", err
        for i in range(30):
            await complete(client, key=f"p{i}")
        clock.advance(120)
        await services.rollouts.tick()
        assert services.store.route("m").weights == {"1": 50, "2": 50}  # paused: no move
        code, _, err = await routerctl(client, capsys, "rollout", "pause", "m")
        assert code == 1 and "already paused" in err
        code, out, _ = await routerctl(client, capsys, "rollout", "resume", "m", "--json")
        assert json.loads(out)["status"] == "running"
        await services.rollouts.tick()  # the step starts over on resume
        assert services.store.route("m").weights == {"1": 50, "2": 50}
        code, out, _ = await routerctl(client, capsys, "rollout", "abort", "m", "--json")
        aborted = json.loads(out)
        assert aborted["status"] == "aborted"
        assert [s["action"] for s in aborted["log"]][-3:] == ["pause", "resume", "abort"]
        assert services.store.route("m").weights == {"1": 100}
        code, _, err = await routerctl(client, capsys, "rollout", "abort", "m")
        assert code == 1 and "no rollout of m is in progress" in err
        code, out, _ = await routerctl(client, capsys, "rollout", "status")
        assert "aborted" in out


async def test_a_rollout_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    specs = [echo(tmp_path, "1"), echo(tmp_path, "2")]
    specs += [echo(tmp_path, "1", name="p"), echo(tmp_path, "2", name="p")]
    services = build(tmp_path, specs, clock)
    async for client in serve(services):
        for name in ("m", "p"):
            await client.put(f"/admin/routes/{name}", json={"weights": {"1": 100}})
            # Latencies are wall-clock here, and a step judged on ten requests takes
            # its p95 from the slowest one: a 5 ms stall of a busy test machine would
            # roll back. The restart is under test, not the latency rule.
            body = {"model": name, "to": "2", "steps": [25, 50, 100], "min_requests": 5}
            response = await client.post(
                "/admin/rollouts", json={**body, "latency_floor_ms": 1000.0}
            )
            assert response.status == 201
        await client.post("/admin/rollouts/p/pause")
        for i in range(40):
            await complete(client, key=f"r{i}")
        clock.advance(61)
        await services.rollouts.tick()
        assert services.store.route("m").weights == {"1": 50, "2": 50}
    assert not services.store.is_open  # the daemon is gone

    clock.advance(5)
    again = build(tmp_path, specs, clock)
    async for client in serve(again):
        m = await (await client.get("/admin/rollouts/m")).json()
        assert (m["status"], m["step"], m["weight"]) == ("running", 2, 50)
        assert m["log"][-1]["action"] == "resumed_after_restart"
        p = await (await client.get("/admin/rollouts/p")).json()
        assert (p["status"], p["step"]) == ("paused", 1)
        # The routing table came back with the step's weights, and the canary warms again.
        assert dict(again.router.table.routes["m"].weights) == {"1": 50, "2": 50}
        for _ in range(200):
            if again.scheduler.instance("m@2") is not None:
                break
            await asyncio.sleep(0.01)
        assert again.scheduler.instance("m@2") is not None
        for i in range(40):
            assert (await complete(client, key=f"s{i}"))[0] == 200
        clock.advance(61)
        await again.rollouts.tick()
        assert again.store.route("m").weights == {"1": 0, "2": 100}
        for i in range(10):
            await complete(client, key=f"t{i}")
        clock.advance(61)
        await again.rollouts.tick()
        m = await (await client.get("/admin/rollouts/m")).json()
        assert m["status"] == "promoted"
        p = await (await client.get("/admin/rollouts/p")).json()
        assert p["status"] == "paused"


async def test_shadow_copies_chat_and_embeddings_and_stream_errors_count(
    tmp_path: Path, clock: FakeClock
) -> None:
    specs = [
        echo(tmp_path, "1"),
        echo(tmp_path, "2", fail_rate=1.0),
        echo(tmp_path, "1", name="e", task="embed"),
        echo(tmp_path, "2", name="e", task="embed"),
    ]
    services = build(tmp_path, specs, clock)
    async for client in serve(services):
        for name in ("m", "e"):
            await client.put(f"/admin/routes/{name}", json={"weights": {"1": 100}})
            await client.put(f"/admin/routes/{name}/shadow", json={"version": "2", "percent": 100})
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        response = await client.post("/v1/chat/completions", json=chat)
        assert response.status == 200 and response.headers["x-routerd-model"] == "m@1"
        response = await client.post("/v1/embeddings", json={"model": "e", "input": ["a", "b"]})
        assert response.status == 200 and response.headers["x-routerd-model"] == "e@1"
        # A stream already answered 200 that ends with an error event is a failed request.
        response = await client.post(
            "/v1/completions",
            json={"model": "m@2", "prompt": "hi", "max_tokens": 3, "stream": True},
        )
        assert response.status == 200
        assert '"error"' in await response.text()
        await services.shadows.wait_idle()
        shadow = services.stats.window("m@2", since=0, kind="shadow")
        assert (shadow.requests, shadow.errors) == (1, 1)
        shadow = services.stats.window("e@2", since=0, kind="shadow")
        assert (shadow.requests, shadow.errors) == (1, 0)
        primary = services.stats.window("m@2", since=0)
        assert (primary.requests, primary.errors) == (1, 1)
        assert services.stats.window("m@1", since=0).errors == 0
