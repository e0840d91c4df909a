"""The admin API and routerctl, against the real app with a fake backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.registry import BackendRegistry
from routerd import ctl
from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    app = build_app(fake_services(tmp_path, backend, [fake_spec(tmp_path, "a")]))
    async with TestClient(TestServer(app, host="127.0.0.1")) as test_client:
        yield test_client


async def routerctl(client: TestClient, capsys, *args: str) -> tuple[int, str, str]:
    url = str(client.make_url("")).rstrip("/")
    code = await asyncio.to_thread(ctl.main, ["--url", url, *args])
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
