"""routerd killed with SIGKILL while it registers versions, then started again.

The real ``routerd serve`` process, talked to as operators do (routerctl over the
admin socket). Afterwards every registration that was acknowledged is still there,
the pin holds (the pinned version is loaded again at start), the stale socket file is
replaced, and the database passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from routerd import ctl
from tests.test_e2e import free_port, wait_healthy

pytestmark = pytest.mark.slow


def start(config: Path, state_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def routerctl(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "routerd.ctl", "--state-dir", str(state_dir), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_sigkill_loses_nothing_that_was_acknowledged(tmp_path):
    state_dir = tmp_path / "state"
    models = tmp_path / "models"
    (models / "echo").mkdir(parents=True)
    config = tmp_path / "routerd.toml"
    config.write_text(f'[server]\nmodel_roots = ["{models}"]\n[devices]\npoll_interval = "100ms"\n')
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "routerd.log"
    process = start(config, state_dir, port, log)
    try:
        wait_healthy(url, process, log, timeout=60)
        registered = routerctl(
            state_dir, "register", "kept", "--path", str(models / "echo"), "--backend", "echo"
        )
        assert registered.returncode == 0, registered.stderr
        assert routerctl(state_dir, "pin", "kept").returncode == 0
        request = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": "kept", "prompt": "hi", "max_tokens": 2}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        for version in ("1", "2"):  # a route and a paused rollout must survive too
            done = routerctl(
                state_dir, "register", "split", "--version", version,
                "--path", str(models / "echo"), "--backend", "echo",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
        for args in (
            ("route", "set", "split", "1=100"),
            ("rollout", "split", "--to", "2", "--steps", "50,100"),
            ("rollout", "pause", "split"),
        ):
            done = routerctl(state_dir, *args)
            assert done.returncode == 0, (args, done.stderr)

        acknowledged: list[str] = []
        target = ctl.Target(socket_path=state_dir / "routerd.sock")

        def register_many() -> None:
            for n in range(1, 10_000):
                try:
                    body = {"name": "burst", "version": str(n), "path": str(models / "echo"),
                            "backend": "echo"}  # fmt: skip
                    ctl.request(target, "POST", "/admin/models", body, timeout=5)
                except ctl.CtlError:
                    return  # the daemon is gone
                acknowledged.append(str(n))

        writer = threading.Thread(target=register_many)
        writer.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # mid-burst: some write is likely in flight
        process.wait(timeout=10)
        writer.join(timeout=10)
        assert len(acknowledged) >= 20
        assert (state_dir / "routerd.sock").exists(), "SIGKILL leaves the socket file behind"

        process = start(config, state_dir, port, log)
        wait_healthy(url, process, log, timeout=60)
        listed = routerctl(state_dir, "models")
        assert listed.returncode == 0, listed.stderr
        by_id = {m["id"]: m for m in json.loads(listed.stdout)["models"]}
        assert by_id["kept@1"]["pinned"] is True
        missing = [n for n in acknowledged if f"burst@{n}" not in by_id]
        assert missing == [], f"acknowledged but lost: {missing}"
        deadline = time.monotonic() + 20  # the pinned version is loaded again at start
        while time.monotonic() < deadline:
            status = json.loads(routerctl(state_dir, "status").stdout)
            if any(i["model"] == "kept" and i["state"] == "ready" for i in status["instances"]):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"pinned model not restored:\n{log.read_text()}")
        rollout = json.loads(routerctl(state_dir, "rollout", "status", "split").stdout)
        assert (rollout["status"], rollout["weight"]) == ("paused", 50), rollout
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert not (state_dir / "routerd.sock").exists(), "a clean stop removes the socket"
    with sqlite3.connect(state_dir / "routerd.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        kinds = [row[0] for row in db.execute("SELECT kind FROM events WHERE model = 'kept'")]
        route = dict(db.execute("SELECT version, weight FROM routes WHERE name = 'split'"))
    assert route == {"1": 50, "2": 50}, "the paused rollout's step, as it was at the kill"
    assert kinds.count("load") == 2, "the load before the kill and the restore after it"
