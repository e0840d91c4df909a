"""The admin API and routerctl, against the real app with a fake backend."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.registry import BackendRegistry
from routerd import ctl
from routerd.api.keys import SERVICES
from routerd.app import build_app
from routerd.ctl.display import format_status
from routerd.devices import DeviceInventory
from routerd.services import Services
from tests.fakes import MEMINFO, FakeBackend, FakeGpus, cpu_only_inventory
from tests.support import ADMIN_AUTH, fake_services, fake_spec, serve_admin_socket

GIB = 1 << 30


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    app = build_app(fake_services(tmp_path, backend, [fake_spec(tmp_path, "a")]))
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=ADMIN_AUTH) as test_client:
        await serve_admin_socket(test_client)
        yield test_client


def services_of(client: TestClient) -> Services:
    return client.server.app[SERVICES]


async def routerctl(client: TestClient, capsys, *args: str) -> tuple[int, str, str]:
    """routerctl as operators run it: over the admin unix socket in the state dir."""
    state_dir = str(services_of(client).live.config.state_dir)
    code = await asyncio.to_thread(ctl.main, ["--state-dir", state_dir, *args])
    out, err = capsys.readouterr()
    return code, out, err


async def test_register_validates_then_serves(client, tmp_path, capsys):
    folder = tmp_path / "new-model"
    folder.mkdir()
    code, out, err = await routerctl(
        client,
        capsys,
        "register",
        "fresh",
        "--version",
        "7",
        "--path",
        str(folder),
        "--backend",
        "fake",
        "--option",
        "bytes=4096",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["id"] == "fresh@7"
    response = await client.post("/v1/completions", json={"model": "fresh", "prompt": "ab"})
    assert response.status == 200
    assert response.headers["x-routerd-model"] == "fresh@7"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"path": "/definitely/not/here"}, "path"),
        ({"backend": "nope"}, "backend"),
        ({"options": {"colour": "red"}}, "options.colour"),
        ({"options": {"device": "gpu9"}}, "options.device"),
        ({"name": "bad name"}, "name"),
        ({"name": "x@y"}, "name"),
    ],
)
async def test_bad_registration_is_400_and_stores_nothing(client, tmp_path, changes, param):
    body = {"name": "m", "version": "1", "backend": "fake", "path": str(tmp_path), **changes}
    response = await client.post("/admin/models", json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == param
    listed = await (await client.get("/admin/models")).json()
    assert [m["id"] for m in listed["models"]] == ["a@1"]


async def test_load_status_evict_cycle(client, capsys, backend):
    code, out, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    assert out.startswith("loaded a@1 on cpu")
    code, out, _ = await routerctl(client, capsys, "status", "--json")
    status = json.loads(out)
    (instance,) = status["instances"]
    assert instance["model"] == "a" and instance["state"] == "ready" and instance["bytes"] == 1000
    assert instance["pinned"] is False and instance["in_flight"] == 0
    assert status["devices"][0]["id"] == "cpu"
    code, out, _ = await routerctl(client, capsys, "status")
    assert "a@1" in out and "ready" in out
    code, out, _ = await routerctl(client, capsys, "models")
    assert "a@1" in out and "ready" in out
    code, out, _ = await routerctl(client, capsys, "evict", "a@1")
    assert code == 0 and "evicted a@1" in out
    assert backend.unloads == ["a@1"]
    events = await (await client.get("/admin/events?model=a")).json()
    assert [e["kind"] for e in events["events"]] == ["evict", "load"]
    assert events["events"][0]["reason"] == "manual"


async def test_loading_a_loaded_model_says_so_instead_of_a_load_time(client, capsys, backend):
    code, out, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    assert out.startswith("loaded a@1 on cpu")
    code, out, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    assert out.strip() == "a@1 was already loaded on cpu (1000 B); nothing to load"
    assert backend.loads == ["a@1"]
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cpu")
    assert code == 0, err
    assert out.strip() == "a@1 was already loaded on cpu (1000 B); nothing to load"
    first = await (await client.post("/admin/load", json={"model": "a"})).json()
    assert first["already_loaded"] is True and first["device"] == "cpu"


async def test_a_load_this_call_made_is_not_called_already_loaded(client):
    answer = await (await client.post("/admin/load", json={"model": "a"})).json()
    assert answer["already_loaded"] is False and answer["state"] == "ready"


async def test_a_loaded_model_asked_onto_another_device_says_how_to_move_it(gpu_client, capsys):
    client, backend = gpu_client
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cuda:1")
    assert code == 0, err
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cuda:0")
    assert code == 0, err
    assert out.strip() == (
        "a@1 was already loaded on cuda:1 (1.0 GiB); nothing to load; "
        "to move it to cuda:0, evict it first"
    )
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cuda")
    assert out.strip() == "a@1 was already loaded on cuda:1 (1.0 GiB); nothing to load"
    assert backend.load_devices == ["cuda:1"]


async def test_routerctl_errors_are_one_line_and_nonzero(client, capsys):
    code, out, err = await routerctl(client, capsys, "load", "missing")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "does not exist" in err and "HTTP 404" in err
    code, _, err = await routerctl(client, capsys, "evict", "a")
    assert code == 1 and "not loaded" in err


def test_routerctl_unreachable_daemon(capsys):
    code = ctl.main(["--url", "http://127.0.0.1:9", "status"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "cannot reach routerd" in err


def test_human_sizes():
    assert ctl.human_bytes(512) == "512 B"
    assert ctl.human_bytes(3 * 1024 * 1024) == "3.0 MiB"


def test_registry_refuses_unknown_backend_kind():
    with pytest.raises(ValueError, match="unknown backend 'x'"):
        BackendRegistry({}).get("x")


# -- events ---------------------------------------------------------------------------


async def test_events_filter_and_carry_the_new_fields(client, capsys):
    store = services_of(client).store
    store.record_event("load", "a", "1", device="cuda:0", reason="request", bytes=2 * GIB)
    store.record_event("load", "b", "1", device="cuda:0", bytes=1024)
    store.record_event(
        "evict",
        "a",
        "1",
        device="cuda:0",
        reason="lru",
        bytes=2 * GIB,
        duration_ms=12.5,
        trigger="b@1",
    )
    store.record_event(
        "load", "a", "2", device="cpu", detail={"bytes": 3 * 1024 * 1024, "source": "host"}
    )

    response = await client.get("/admin/events", params={"model": "a"})
    assert response.status == 200
    events = (await response.json())["events"]
    assert [(e["kind"], e["version"]) for e in events] == [
        ("load", "2"),
        ("evict", "1"),
        ("load", "1"),
    ]
    evict = events[1]
    assert {k: evict[k] for k in ("model", "device", "reason", "bytes", "duration_ms")} == {
        "model": "a",
        "device": "cuda:0",
        "reason": "lru",
        "bytes": 2 * GIB,
        "duration_ms": 12.5,
    }
    assert evict["trigger"] == "b@1"
    assert events[0]["bytes"] is None and events[0]["trigger"] is None

    one = await (await client.get("/admin/events", params={"model": "a@1", "limit": "1"})).json()
    assert [(e["kind"], e["version"]) for e in one["events"]] == [("evict", "1")]
    everything = await (await client.get("/admin/events")).json()
    assert len(everything["events"]) == 4

    malformed = [{"model": "bad name"}, {"model": "a@"}, {"model": "a@1@1"}, {"model": "@1"}]
    for query, param in [*((q, "model") for q in malformed), ({"limit": "0"}, "limit")]:
        response = await client.get("/admin/events", params=query)
        assert response.status == 400
        assert (await response.json())["error"]["param"] == param

    code, out, err = await routerctl(client, capsys, "events", "--model", "a", "--limit", "2")
    assert code == 0, err
    header, *rows = out.splitlines()
    headers = ["TIME", "KIND", "MODEL", "DEVICE", "REASON", "BYTES", "FOR", "WHERE"]
    assert header.split() == headers
    assert len(rows) == 2
    assert rows[0].split()[2:] == ["load", "a@2", "cpu", "-", "3.0", "MiB", "-", "host"]
    assert rows[1].split()[2:] == ["evict", "a@1", "cuda:0", "lru", "2.0", "GiB", "b@1", "-"]

    code, out, err = await routerctl(client, capsys, "events", "--json")
    assert code == 0, err
    assert [e["model"] for e in json.loads(out)["events"]] == ["a", "a", "b", "a"]

    code, out, err = await routerctl(client, capsys, "events", "--model", "nobody")
    assert (code, out.strip()) == (0, "no events")


# -- why ------------------------------------------------------------------------------


async def test_why_after_a_load_and_an_evict(client, capsys):
    response = await client.get("/admin/why/a")
    assert await response.json() == {
        "model": "a@1",
        "explanation": "a@1 has never been loaded since the event log began.",
    }

    code, _, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    code, out, err = await routerctl(client, capsys, "why", "a")
    assert code == 0, err
    assert out.startswith("a@1 was loaded on cpu just now")
    assert "it occupies 1000 bytes" in out and out.strip().endswith("not been evicted since.")

    code, _, err = await routerctl(client, capsys, "evict", "a")
    assert code == 0, err
    why = await (await client.get("/admin/why/a@1")).json()
    assert why["model"] == "a@1"
    text = why["explanation"]
    assert text.startswith("a@1 was evicted from cpu just now because an operator asked for it")
    assert "It had been resident for 0s, since it was loaded on cpu just now." in text
    assert "freed 1000 bytes" in text

    code, out, err = await routerctl(client, capsys, "why", "a@1", "--json")
    assert code == 0, err
    assert json.loads(out) == why


async def test_why_names_unknown_models_and_old_versions(client, capsys):
    code, out, err = await routerctl(client, capsys, "why", "nobody")
    assert (code, out) == (1, "")
    assert "does not exist" in err and "HTTP 404" in err
    response = await client.get("/admin/why/a@9")
    assert response.status == 404
    for malformed in ("a@", "a@1@1", "@1"):
        response = await client.get(f"/admin/why/{malformed}")
        assert response.status == 400, malformed
        assert (await response.json())["error"]["param"] == "model"

    # A version no longer registered is still explained from its events.
    services_of(client).store.record_event(
        "evict", "gone", "3", device="cpu", reason="ttl", bytes=2048
    )
    why = await (await client.get("/admin/why/gone@3")).json()
    assert why["explanation"].startswith("gone@3 was evicted from cpu")
    assert "idle for longer than its keep_alive" in why["explanation"]


# -- pins -----------------------------------------------------------------------------


async def test_pin_and_unpin_round_trip(client, capsys):
    services = services_of(client)
    code, out, err = await routerctl(client, capsys, "pin", "a")
    assert code == 0, err
    assert out.strip() == "pinned a@1"
    assert services.store.is_pinned("a", "1")
    listed = await (await client.get("/admin/models")).json()
    assert [(m["id"], m["pinned"]) for m in listed["models"]] == [("a@1", True)]
    code, out, _ = await routerctl(client, capsys, "models")
    header, row = out.splitlines()
    assert "PINNED" in header.split() and "yes" in row.split()

    code, out, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    code, out, _ = await routerctl(client, capsys, "status", "--json")
    assert json.loads(out)["instances"][0]["pinned"] is True

    code, out, err = await routerctl(client, capsys, "unpin", "a@1", "--json")
    assert code == 0, err
    unpinned = json.loads(out)
    assert (unpinned["id"], unpinned["pinned"], unpinned["state"]) == ("a@1", False, "ready")
    assert not services.store.is_pinned("a", "1")
    listed = await (await client.get("/admin/models")).json()
    assert [m["pinned"] for m in listed["models"]] == [False]
    code, out, _ = await routerctl(client, capsys, "status", "--json")
    assert json.loads(out)["instances"][0]["pinned"] is False

    code, _, err = await routerctl(client, capsys, "pin", "nobody")
    assert code == 1 and "HTTP 404" in err
    response = await client.post("/admin/pin", json={})
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "model"


# -- load on a device, forced eviction, status columns --------------------------------


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu0", "device must be cpu, cuda or cuda:N"),
        ("cuda:", "device must be cpu, cuda or cuda:N"),
        (" cpu", "device must be cpu, cuda or cuda:N"),
        (0, "device must be cpu, cuda or cuda:N"),
        ("cuda:3", "device cuda:3 does not exist here (devices: cpu)"),
        ("cuda", "device cuda does not exist here (devices: cpu)"),
    ],
)
async def test_load_with_a_bad_device_is_400(client, backend, device, message):
    response = await client.post("/admin/load", json={"model": "a", "device": device})
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == "device"
    assert message in error["message"]
    assert backend.loads == []


async def test_routerctl_load_on_a_device(client, capsys, backend):
    code, _, err = await routerctl(client, capsys, "load", "a", "--device", "cuda:0")
    assert code == 1 and "HTTP 400" in err and "does not exist" in err
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cpu")
    assert code == 0, err
    assert out.startswith("loaded a@1 on cpu")
    assert backend.load_devices == ["cpu"]


@pytest.fixture
async def gpu_client(tmp_path: Path):
    gpus = FakeGpus([8 * GIB, 8 * GIB])
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    devices = DeviceInventory(gpus, meminfo=meminfo, cpu_budget=4 * GIB)
    backend = FakeBackend(gpus)
    services = fake_services(
        tmp_path, backend, [fake_spec(tmp_path, "a", bytes=GIB)], devices=devices
    )
    async with TestClient(
        TestServer(build_app(services), host="127.0.0.1"), headers=ADMIN_AUTH
    ) as test_client:
        await serve_admin_socket(test_client)
        yield test_client, backend


async def test_load_on_the_gpu_asked_for(gpu_client, capsys):
    client, backend = gpu_client
    code, out, err = await routerctl(client, capsys, "load", "a", "--device", "cuda:1")
    assert code == 0, err
    assert out.startswith("loaded a@1 on cuda:1 (1.0 GiB)")
    assert backend.load_devices == ["cuda:1"]
    code, out, err = await routerctl(client, capsys, "why", "a")
    assert out.startswith("a@1 was loaded on cuda:1 just now"), err


async def test_status_shows_each_budget_beside_the_machine(tmp_path, capsys):
    """A CPU budget far below the machine's RAM must not read as the machine's RAM."""
    devices = cpu_only_inventory(tmp_path, cpu_budget=250 << 20)
    services = fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "a")], devices=devices)
    async with TestClient(
        TestServer(build_app(services), host="127.0.0.1"), headers=ADMIN_AUTH
    ) as client:
        await serve_admin_socket(client)
        code, out, err = await routerctl(client, capsys, "status")
    assert code == 0, err
    header, row, note = out.splitlines()[:3]
    assert header.split() == ["DEVICE", "TOTAL", "USED", "BUDGET", "RESERVED", "ROUTERD"]
    # MEMINFO: 16000000 kB in all, 12000000 kB available
    assert row.split() == ["cpu", "15.3", "GiB", "3.8", "GiB", "250.0", "MiB", "0", "B", "0", "B"]
    assert "BUDGET is what routerd may use" in note


def test_status_from_a_daemon_without_budgets_shows_a_dash():
    device = {"id": "cpu", "total_bytes": 1 << 30, "used_bytes": 0, "reserved_bytes": 0}
    text = format_status({"devices": [device], "instances": []})
    assert text.splitlines()[1].split() == ["cpu", "1.0", "GiB", "0", "B", "-", "0", "B", "0", "B"]


async def test_evict_force_is_sent_to_the_scheduler(client, capsys, monkeypatch):
    scheduler = services_of(client).scheduler
    calls: list[dict[str, Any]] = []
    real_evict = scheduler.evict

    async def recording_evict(model_id: str, **kwargs: Any):
        calls.append({"model_id": model_id, **kwargs})
        return await real_evict(model_id, **kwargs)

    monkeypatch.setattr(scheduler, "evict", recording_evict)
    for force in (True, False):
        code, _, err = await routerctl(client, capsys, "load", "a")
        assert code == 0, err
        extra = ["--force"] if force else []
        code, out, err = await routerctl(client, capsys, "evict", "a", *extra)
        assert code == 0, err
        assert out.startswith("evicted a@1")
    assert calls == [
        {"model_id": "a@1", "reason": "manual", "force": True},
        {"model_id": "a@1", "reason": "manual", "force": False},
    ]

    response = await client.post("/admin/evict", json={"model": "a", "force": "yes"})
    assert response.status == 400
    assert (await response.json())["error"]["param"] == "force"


async def test_status_shows_estimated_and_measured_size(client, capsys, tmp_path):
    folder = tmp_path / "sized"
    folder.mkdir()
    code, _, err = await routerctl(
        client,
        capsys,
        "register",
        "sized",
        "--path",
        str(folder),
        "--backend",
        "fake",
        "--option",
        "estimate=4096",
        "--option",
        "bytes=3072",
    )
    assert code == 0, err
    code, _, err = await routerctl(client, capsys, "load", "sized")
    assert code == 0, err
    code, out, err = await routerctl(client, capsys, "status")
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("MODEL"))
    row = next(line for line in lines if line.startswith("sized@1"))
    assert header.split()[:6] == ["MODEL", "DEVICE", "STATE", "ESTIMATED", "SIZE", "IN"]
    assert row.split()[:7] == ["sized@1", "cpu", "ready", "4.0", "KiB", "3.0", "KiB"]


def test_instance_table_without_the_new_fields():
    """A daemon that predates estimates and keep-alive still gets a readable table."""
    now = time.time()
    old = {
        "model": "m",
        "version": "1",
        "device": "cpu",
        "state": "ready",
        "bytes": 2048,
        "in_flight": 0,
        "last_used": now,
    }
    header, row = ctl.format_instances([old]).splitlines()
    assert header.split() == ["MODEL", "DEVICE", "STATE", "SIZE", "IN", "FLIGHT", "LAST", "USED"]
    assert row.split()[:5] == ["m@1", "cpu", "ready", "2.0", "KiB"]

    new = {
        **old,
        "estimated_bytes": 0,
        "measured_bytes": None,
        "pinned": True,
        "expires_at": now + 600,
    }
    header, row = ctl.format_instances([new]).splitlines()
    assert header.split()[3:5] == ["ESTIMATED", "SIZE"] and header.endswith("EXPIRES")
    assert row.split()[:6] == ["m@1", "cpu", "ready,", "pinned", "-", "-"]
    assert row.endswith("in 10m")


async def test_routerctl_reprofile_reloads_with_a_new_profile(client, capsys, backend):
    code, _, err = await routerctl(client, capsys, "load", "a")
    assert code == 0, err
    code, _, err = await routerctl(client, capsys, "load", "a", "--reprofile")
    assert code == 1 and "HTTP 409" in err and "evict it first" in err
    code, _, err = await routerctl(client, capsys, "evict", "a")
    assert code == 0, err
    code, _, err = await routerctl(client, capsys, "load", "a")  # trusts the stored one
    assert code == 0, err
    await routerctl(client, capsys, "evict", "a")
    code, _, err = await routerctl(client, capsys, "load", "a", "--reprofile")
    assert code == 0, err
    assert [known is not None for known in backend.knowns] == [False, True, False]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/load", {"model": "a", "reprofile": "yes"}, "reprofile"),
        ("/admin/load", {"model": "a", "force": True}, "force"),
        ("/admin/evict", {"model": "a", "device": "cpu"}, "device"),
    ],
)
async def test_admin_load_and_evict_refuse_what_they_do_not_take(
    client, backend, path, body, param
):
    response = await client.post(path, json=body)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == param
    assert backend.loads == []
