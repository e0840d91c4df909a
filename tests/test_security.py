"""Who may call what: the admin socket, the admin token over TCP, API keys, model roots."""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd import ctl
from routerd.admin_socket import AdminSocketError, bind_admin_socket
from routerd.api.auth import matches_any
from routerd.api.keys import SERVICES
from routerd.app import build_app
from routerd.config import Config, ConfigError, ServerConfig, load_config
from routerd.model_paths import check_model_folder
from tests.fakes import FakeBackend
from tests.support import ADMIN_AUTH, ADMIN_TOKEN, fake_services, fake_spec, serve_admin_socket

API_KEY = "sk-routerd-test-key-0001"


def assert_openai_error(body: dict, status_code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status_code and body["error"]["message"]


async def _client(tmp_path: Path, server: ServerConfig) -> TestClient:
    services = fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "a")], server=server)
    client = TestClient(TestServer(build_app(services), host="127.0.0.1"))
    await client.start_server()
    await serve_admin_socket(client)
    return client


def _unix_session(client: TestClient) -> aiohttp.ClientSession:
    path = client.server.app[SERVICES].live.config.socket_path
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)))


# -- admin API ----------------------------------------------------------------------


async def test_admin_over_tcp_is_off_without_a_token_but_served_on_the_socket(tmp_path):
    client = await _client(tmp_path, ServerConfig())
    try:
        refused = await client.get("/admin/status")
        assert refused.status == 403
        body = await refused.json()
        assert_openai_error(body, "forbidden")
        assert "unix socket" in body["error"]["message"]
        # unknown admin paths are refused before routing, too
        assert (await client.post("/admin/evict", json={"model": "a"})).status == 403
        async with (
            _unix_session(client) as session,
            session.get("http://localhost/admin/status") as over_socket,
        ):
            assert over_socket.status == 200
            assert "instances" in await over_socket.json()
        # the OpenAI API stays open over TCP when no keys are configured
        assert (await client.get("/v1/models")).status == 200
    finally:
        await client.close()


async def test_admin_socket_is_private_to_the_service_user(tmp_path):
    client = await _client(tmp_path, ServerConfig())
    try:
        path = client.server.app[SERVICES].live.config.socket_path
        info = path.lstat()
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
    finally:
        await client.close()


async def test_admin_over_tcp_needs_the_configured_token(tmp_path):
    client = await _client(tmp_path, ServerConfig(admin_token=ADMIN_TOKEN))
    try:
        missing = await client.get("/admin/status")
        assert missing.status == 401
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert_openai_error(await missing.json(), "invalid_api_key")
        wrong = await client.get(
            "/admin/status", headers={"Authorization": "Bearer " + ADMIN_TOKEN[:-1] + "x"}
        )
        assert wrong.status == 401
        basic = await client.get("/admin/status", headers={"Authorization": "Basic abc"})
        assert basic.status == 401
        right = await client.get("/admin/status", headers=ADMIN_AUTH)
        assert right.status == 200
    finally:
        await client.close()


async def test_routerctl_over_tcp_sends_the_token_from_the_environment(tmp_path, monkeypatch):
    client = await _client(tmp_path, ServerConfig(admin_token=ADMIN_TOKEN))
    url = str(client.make_url("")).rstrip("/")
    try:
        monkeypatch.delenv("ROUTERD_ADMIN_TOKEN", raising=False)
        assert await asyncio.to_thread(ctl.main, ["--url", url, "status"]) == 1
        monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)
        assert await asyncio.to_thread(ctl.main, ["--url", url, "status", "--json"]) == 0
    finally:
        await client.close()


async def test_routerctl_says_why_when_refused(tmp_path, capsys, monkeypatch):
    client = await _client(tmp_path, ServerConfig())
    url = str(client.make_url("")).rstrip("/")
    monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)
    try:
        code = await asyncio.to_thread(ctl.main, ["--url", url, "models"])
        _, err = capsys.readouterr()
        assert code == 1
        assert err.count("\n") == 1 and "HTTP 403" in err and "unix socket" in err
        state_dir = str(client.server.app[SERVICES].live.config.state_dir)
        assert await asyncio.to_thread(ctl.main, ["--state-dir", state_dir, "models"]) == 0
    finally:
        await client.close()


def test_routerctl_without_a_daemon_names_the_socket(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ROUTERD_URL", raising=False)
    monkeypatch.setenv("ROUTERD_STATE_DIR", str(tmp_path))
    assert ctl.main(["status"]) == 1
    _, err = capsys.readouterr()
    assert str(tmp_path / "routerd.sock") in err and "no such socket" in err


def test_routerctl_picks_its_target(tmp_path, monkeypatch):
    monkeypatch.setenv("ROUTERD_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("ROUTERD_STATE_DIR", str(tmp_path / "env"))
    monkeypatch.delenv("ROUTERD_URL", raising=False)
    assert ctl.resolve_target(None, None) == ctl.Target(socket_path=tmp_path / "env/routerd.sock")
    assert ctl.resolve_target(None, str(tmp_path)) == ctl.Target(
        socket_path=tmp_path / "routerd.sock"
    )
    by_flag = ctl.resolve_target("http://h:1", str(tmp_path))
    assert by_flag == ctl.Target(url="http://h:1", token=ADMIN_TOKEN)
    monkeypatch.setenv("ROUTERD_URL", "http://e:2")
    assert ctl.resolve_target(None, None).url == "http://e:2"
    # a token is only ever sent over TCP; the socket needs none
    assert ctl.resolve_target(None, str(tmp_path)).token is None


# -- API keys -----------------------------------------------------------------------


async def test_api_keys_guard_the_openai_api_over_tcp(tmp_path):
    client = await _client(tmp_path, ServerConfig(api_keys=(API_KEY, "sk-another-key-00000")))
    try:
        missing = await client.post("/v1/completions", json={"model": "a", "prompt": "x"})
        assert missing.status == 401
        assert_openai_error(await missing.json(), "invalid_api_key")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer sk-nope"})
        assert wrong.status == 401
        assert "Incorrect API key" in (await wrong.json())["error"]["message"]
        ok = await client.post(
            "/v1/completions",
            json={"model": "a", "prompt": "x", "max_tokens": 2},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
        assert ok.status == 200
        assert (await client.get("/health")).status == 200, "health needs no key"
        async with (
            _unix_session(client) as session,
            session.get("http://localhost/v1/models") as over_socket,
        ):
            assert over_socket.status == 200
    finally:
        await client.close()


def test_key_comparison_is_exact():
    assert matches_any(API_KEY, ["sk-other-key-0000000", API_KEY])
    assert not matches_any(API_KEY[:-1], [API_KEY])
    assert not matches_any(API_KEY + "x", [API_KEY])
    assert not matches_any("", [API_KEY])
    assert not matches_any(API_KEY, [])


# -- config -------------------------------------------------------------------------


def test_secrets_from_files_and_their_checks(tmp_path):
    (tmp_path / "admin.token").write_text(ADMIN_TOKEN + "\n")
    (tmp_path / "keys").write_text(f"# one key a line\n{API_KEY}\n\nsk-second-key-000000\n")
    config_file = tmp_path / "routerd.toml"
    config_file.write_text(
        '[server]\nadmin_token_file = "admin.token"\napi_keys_file = "keys"\n'
        'api_keys = ["sk-inline-key-0000000"]\nmodel_roots = ["models", "/srv/models"]\n'
    )
    config = load_config(config_file)
    assert config.server.admin_token == ADMIN_TOKEN
    assert config.server.api_keys == ("sk-inline-key-0000000", API_KEY, "sk-second-key-000000")
    assert config.server.model_roots == (tmp_path / "models", Path("/srv/models"))
    assert config.server.host == "127.0.0.1", "loopback unless asked otherwise"
    assert ADMIN_TOKEN not in repr(config), "secrets stay out of logs and reprs"

    for body, message in [
        ('admin_token = "short"', "at least 16"),
        (f'admin_token = "{ADMIN_TOKEN}"\nadmin_token_file = "admin.token"', "not both"),
        ('api_keys_file = "missing"', "cannot read"),
        ("model_roots = []", "non-empty list"),
        ('request_timeout = "0s"', "positive"),
        ("max_streams = 0", "at least 1"),
    ]:
        config_file.write_text(f"[server]\n{body}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(config_file)


def test_default_model_root_is_under_the_state_dir(tmp_path):
    config = Config(state_dir=tmp_path)
    assert config.allowed_model_roots == (tmp_path / "models",)
    assert replace(config, demo=True).allowed_model_roots == (
        tmp_path / "models",
        tmp_path / "demo",
    )


# -- model roots --------------------------------------------------------------------


def test_model_folders_must_lie_under_a_root(tmp_path):
    root = tmp_path / "models"
    inside = root / "llama"
    inside.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x")
    assert check_model_folder(str(inside), [root]) == inside.resolve()
    cases = {
        str(outside): "outside the model roots",
        f"{root}/../elsewhere": "'..'",
        "llama": "absolute",
        str(root / "missing"): "does not exist",
    }
    escape = root / "escape"
    escape.symlink_to(outside, target_is_directory=True)
    cases[str(escape)] = "outside the model roots"
    linked = root / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(outside / "secret.safetensors")
    cases[str(linked)] = "links outside"
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            check_model_folder(path, [root])
        assert getattr(caught.value, "param", None) == "path"
    # a link that stays inside the root is fine (e.g. a hub cache's blobs)
    (root / "blobs").mkdir()
    (root / "blobs" / "w").write_bytes(b"w")
    (inside / "model.safetensors").symlink_to(root / "blobs" / "w")
    assert check_model_folder(str(inside), [root]) == inside.resolve()


async def test_registering_outside_the_roots_is_400_and_stores_nothing(tmp_path):
    roots = (tmp_path / "models",)
    client = await _client(tmp_path, ServerConfig(admin_token=ADMIN_TOKEN, model_roots=roots))
    outside = tmp_path / "outside"
    outside.mkdir()
    try:
        response = await client.post(
            "/admin/models",
            json={"name": "x", "path": str(outside), "backend": "fake"},
            headers=ADMIN_AUTH,
        )
        assert response.status == 400
        body = await response.json()
        assert body["error"]["param"] == "path" and "outside" in body["error"]["message"]
        listed = await (await client.get("/admin/models", headers=ADMIN_AUTH)).json()
        assert [m["id"] for m in listed["models"]] == ["a@1"]
    finally:
        await client.close()


# -- the socket file ----------------------------------------------------------------


def test_a_stale_socket_is_replaced_and_a_live_one_is_kept(tmp_path):
    path = tmp_path / "routerd.sock"
    first = bind_admin_socket(path)
    first.listen(1)
    with pytest.raises(AdminSocketError, match="another routerd"):
        bind_admin_socket(path)
    first.close()  # as after SIGKILL: the file stays, nobody answers
    assert path.exists()
    second = bind_admin_socket(path)
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        second.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(AdminSocketError, match="not a socket"):
        bind_admin_socket(path)
    with pytest.raises(AdminSocketError, match="longer than"):
        bind_admin_socket(tmp_path / ("d" * 120) / "routerd.sock")


async def test_no_spelling_of_an_admin_path_gets_past_the_check(tmp_path):
    client = await _client(tmp_path, ServerConfig())
    tricky = [
        "/admin/status",
        "//admin/status",
        "/v1/../admin/status",
        "/v1/%2e%2e/admin/status",
        "/admin%2Fstatus",
        "/admin/./status",
        "/./admin/status",
        "/admin/status/",
        "/admin/status?x=1",
    ]
    try:
        for path in tricky:
            status, body = await _raw_get(client.port, path)
            assert status in (400, 403, 404), (path, status)
            assert b"devices" not in body
    finally:
        await client.close()


async def _raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` byte for byte as written (a client library would normalize it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1]), answer


def test_listening_beyond_loopback_without_keys_is_warned_about(caplog):
    from routerd.cli import _warn_if_exposed

    with caplog.at_level("INFO", logger="routerd"):
        _warn_if_exposed(Config())
        assert caplog.records == [], "loopback: nothing to say"
        _warn_if_exposed(Config(server=ServerConfig(host="0.0.0.0")))
    messages = [r.getMessage() for r in caplog.records]
    assert any("no server.api_keys" in m for m in messages)
    assert any("admin API over TCP is off" in m for m in messages)
    caplog.clear()
    guarded = ServerConfig(host="0.0.0.0", api_keys=(API_KEY,), admin_token=ADMIN_TOKEN)
    with caplog.at_level("INFO", logger="routerd"):
        _warn_if_exposed(Config(server=guarded))
    assert caplog.records == []
