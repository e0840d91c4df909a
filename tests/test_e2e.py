"""End to end: the real ``routerd serve --demo`` process, driven by the openai SDK.

This is what a user does after ``make run``: the process is started on a free port
with its own state dir (the demo models built once for the session are reused),
and talked to over HTTP only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    def __init__(self, process: subprocess.Popen[bytes], url: str, state_dir: Path, log: Path):
        self.process = process
        self.url = url
        self.state_dir = state_dir
        self.log = log

    def routerctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "routerd.ctl", "--state-dir", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"routerd exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"routerd did not become ready:\n{log.read_text()}")


@pytest.fixture(scope="module")
def daemon(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    state_dir = tmp_path_factory.mktemp("e2e-state")
    shutil.copytree(demo_root, state_dir / "demo")  # built once per session, reused here
    port = free_port()
    log = state_dir / "routerd.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "routerd",
                "serve",
                "--demo",
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log, timeout=120)
        yield Daemon(process, url, state_dir, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def sdk(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)


def test_models_are_listed_once_each_with_their_versions(sdk: openai.OpenAI) -> None:
    models = list(sdk.models.list())
    ids = [m.id for m in models]
    assert len(ids) == len(set(ids))
    assert {"demo-small", "demo-medium", "demo-large", "demo-embed"} <= set(ids)
    small = next(m for m in models if m.id == "demo-small")
    assert (small.model_extra or {})["versions"] == ["demo-small@1"]
    assert sdk.models.retrieve("demo-small@1").id == "demo-small@1"


def test_completion(sdk: openai.OpenAI) -> None:
    raw = sdk.completions.with_raw_response.create(
        model="demo-small", prompt="def main():", max_tokens=8, temperature=0
    )
    completion = raw.parse()
    assert raw.headers["x-routerd-model"] == "demo-small@1"
    assert raw.headers["x-routerd-device"] == "cpu"
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    again = sdk.completions.create(
        model="demo-small", prompt="def main():", max_tokens=8, temperature=0
    )
    assert again.choices[0].text == completion.choices[0].text, "greedy output is deterministic"


def test_chat_streaming(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= 1
    whole = sdk.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert whole.choices[0].message.content == text


def test_embeddings(sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model="demo-embed", input=["a cat", "a dog", "a cat"])
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3
    assert sum(x * x for x in vectors[0]) == pytest.approx(1.0, abs=1e-4)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert result.usage.prompt_tokens > 0


def test_unknown_model_is_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="no-such-model", prompt="x")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_bad_request_is_400(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="demo-small", prompt="x", temperature=5)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"


def test_routerctl_status_json_and_evict(daemon: Daemon, sdk: openai.OpenAI) -> None:
    sdk.completions.create(model="demo-small", prompt="x", max_tokens=1)
    status = daemon.routerctl("status", "--json")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    assert {"id", "kind", "total_bytes", "used_bytes", "reserved_bytes"} <= set(
        parsed["devices"][0]
    )
    instance = next(i for i in parsed["instances"] if i["model"] == "demo-small")
    assert {
        "model",
        "version",
        "device",
        "state",
        "bytes",
        "in_flight",
        "pinned",
        "last_used",
    } <= set(instance)
    assert instance["state"] == "ready" and instance["bytes"] > 0
    evicted = daemon.routerctl("evict", "demo-small", "--json")
    assert evicted.returncode == 0, evicted.stderr
    assert json.loads(evicted.stdout)["evicted"][0]["model"] == "demo-small"
    missing = daemon.routerctl("evict", "demo-small")
    assert missing.returncode != 0
    assert missing.stderr.strip().count("\n") == 0 and "not loaded" in missing.stderr


def test_operations_endpoints_and_routerctl_ps(daemon: Daemon, sdk: openai.OpenAI) -> None:
    sdk.completions.create(model="demo-small", prompt="x", max_tokens=2)
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'routerd_loads_total{model="demo-small",result="ok",version="1"}' in metrics
    assert 'routerd_device_memory_bytes{device="cpu",kind="ours"}' in metrics
    with urllib.request.urlopen(daemon.url + "/openapi.json", timeout=10) as response:
        assert "/v1/chat/completions" in json.loads(response.read())["paths"]
    ps = daemon.routerctl("ps")
    assert ps.returncode == 0, ps.stderr
    assert ps.stdout.splitlines()[0].split()[:3] == ["NAME", "DEVICE", "SIZE"]
    assert any(line.startswith("demo-small@1") for line in ps.stdout.splitlines())


def test_sigterm_shuts_down_cleanly(daemon: Daemon) -> None:
    """Runs last in this module: the fixture's daemon is stopped here."""
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=60) == 0
    log = daemon.log.read_text()
    assert "stopped" in log
