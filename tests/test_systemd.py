"""systemd: the notify protocol over a socket the test opens, the unit file, and the real
daemon under a fake service manager (READY, WATCHDOG, SIGHUP reload, STOPPING)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from routerd import systemd
from tests.test_e2e import free_port, wait_healthy

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket like systemd's, at a short path (sun_path holds 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder)


def messages_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Datagrams received until one contains the line ``wanted``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if wanted in seen[-1].split("\n"):
            return seen
    raise AssertionError(f"no {wanted} within {timeout}s; got {seen}")


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert systemd.notify("READY=1\nSTATUS=up", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert not systemd.notify("READY=1", {}), "outside systemd it does nothing"


def test_notify_to_an_abstract_socket() -> None:
    name = f"routerd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert systemd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(64) == b"WATCHDOG=1"


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({}) is None
    mine = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(mine) == 1.0
    assert systemd.watchdog_interval({**mine, "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_unit_file_declares_what_operations_need() -> None:
    unit = (REPO / "systemd" / "routerd.service").read_text()
    lines = {line.split("=", 1)[0]: line for line in unit.splitlines() if "=" in line}
    for expected in (
        "Type=notify", "Restart=on-failure", "StateDirectory=routerd", "User=routerd",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):  # fmt: skip
        assert expected in unit.splitlines(), expected
    assert "char-nvidia-frontend" in unit and "DevicePolicy=closed" in unit
    stop = int(lines["TimeoutStopSec"].split("=")[1])
    assert stop > 30, "above the default server.shutdown_timeout of 30s"
    assert int(lines["WatchdogSec"].split("=")[1].rstrip("s")) >= 2


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """The unit as shipped, with ExecStart pointed at this checkout's routerd."""
    routerd = Path(sys.executable).parent / "routerd"
    if not routerd.exists():
        pytest.skip("routerd is not installed in this environment")
    unit = (REPO / "systemd" / "routerd.service").read_text()
    unit = unit.replace("/opt/routerd/.venv/bin/routerd", str(routerd))
    path = tmp_path / "routerd.service"
    path.write_text(unit)
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert "routerd.service" not in verified.stderr, verified.stderr


def _config(path: Path, models: list[str], folder: Path, *, broken: bool = False) -> None:
    text = 'log_level = "info"\n[scheduler]\nkeep_alive = "5m"\n'
    text += f'[server]\nmodel_roots = ["{folder.parent}"]\n'
    for name in models:
        text += f'[[models]]\nname = "{name}"\nbackend = "echo"\npath = "{folder}"\n'
    if broken:
        text += "[scheduler]\nnot_a_key = 1\n"
    path.write_text(text)


def _model_ids(url: str) -> set[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:
        return {m["id"] for m in json.loads(response.read())["data"]}


def test_daemon_under_a_service_manager(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    folder = tmp_path / "echo-model"
    folder.mkdir()
    config = tmp_path / "routerd.toml"
    _config(config, ["e1"], folder)
    port = free_port()
    log = tmp_path / "routerd.log"
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    command = [sys.executable, "-m", "routerd", "serve", "--config", str(config),
               "--port", str(port), "--state-dir", str(tmp_path / "state"),
               "--log-format", "json"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        messages_until(sock, "READY=1", timeout=120)
        wait_healthy(url, process, log, timeout=30)  # READY=1 came once it was listening
        pings = messages_until(sock, "WATCHDOG=1", timeout=2)
        pings += messages_until(sock, "WATCHDOG=1", timeout=2)
        assert sum(m == "WATCHDOG=1" for m in pings) >= 2
        assert "e1" in _model_ids(url)

        _config(config, ["e1", "e2"], folder)
        process.send_signal(signal.SIGHUP)
        reload_messages = messages_until(sock, "READY=1", timeout=10)
        assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in reload_messages)
        assert {"e1", "e2"} <= _model_ids(url)

        _config(config, ["e3"], folder, broken=True)
        process.send_signal(signal.SIGHUP)
        messages_until(sock, "READY=1", timeout=10)
        assert {"e1", "e2"} <= _model_ids(url), "a bad file changes nothing"
        assert "e3" not in _model_ids(url)

        process.send_signal(signal.SIGTERM)
        messages_until(sock, "STOPPING=1", timeout=30)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "reload" in events and "reload_failed" in events
    failed = next(line for line in lines if line.get("event") == "reload_failed")
    assert "not_a_key" in failed["msg"] or "scheduler" in failed["msg"]
    assert lines[-1]["msg"] == "stopped"


async def test_watchdog_pings_come_from_the_event_loop(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocked loop sends nothing, which is what lets systemd restart a stuck daemon."""
    import asyncio

    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    pinger = asyncio.create_task(systemd.watchdog(0.02))
    await asyncio.sleep(0.1)
    time.sleep(0.3)  # the loop is stuck: no ping may leave meanwhile
    sock.settimeout(0)
    queued = []
    while True:
        try:
            queued.append(sock.recv(64))
        except BlockingIOError:
            break
    pinger.cancel()
    assert 2 <= len(queued) <= 8, queued  # ~5 from the 0.1 s of a free loop, none from 0.3 s
    assert set(queued) == {b"WATCHDOG=1"}
