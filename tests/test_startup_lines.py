"""What ``routerd serve`` tells a new user once it listens: models, what to try, what next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routerd.cli import startup_lines
from routerd.config import Config, ServerConfig, default_state_dir

DEMO = ["demo-embed", "demo-large", "demo-medium", "demo-small"]


def _config(host: str = "127.0.0.1", port: int = 8400) -> Config:
    return Config(server=ServerConfig(host=host, port=port), state_dir=default_state_dir())


def test_names_the_models_the_url_and_the_next_step() -> None:
    lines = startup_lines(_config(port=9001), DEMO)
    assert lines[0] == "models: demo-embed, demo-large, demo-medium, demo-small"
    assert "try: curl -s http://127.0.0.1:9001/v1/models" in lines
    (chat,) = [line for line in lines if "/v1/chat/completions" in line]
    assert chat.startswith("try: curl -s http://127.0.0.1:9001/v1/chat/completions")
    body = json.loads(chat.split(" -d ", 1)[1].strip("'"))
    assert body["model"] == "demo-large"  # the first that is not an embedding model
    assert lines[-1].startswith("next: routerctl status")
    assert len(lines) <= 5


def test_only_embedding_models_still_get_an_example() -> None:
    lines = startup_lines(_config(), ["demo-embed"])
    (chat,) = [line for line in lines if "/v1/chat/completions" in line]
    assert '"model": "demo-embed"' in chat


def test_no_models_says_how_to_get_some() -> None:
    lines = startup_lines(_config(), [])
    assert lines[0].startswith("no models registered yet: routerctl register")
    assert "try: curl -s http://127.0.0.1:8400/v1/models" in lines


@pytest.mark.parametrize(
    ("host", "shown"),
    [("0.0.0.0", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]"), ("10.1.2.3", "10.1.2.3")],
)
def test_the_url_is_one_curl_reaches(host: str, shown: str) -> None:
    lines = startup_lines(_config(host=host), ["m"])
    assert f"try: curl -s http://{shown}:8400/v1/models" in lines


def test_api_keys_and_a_state_dir_of_its_own_show_in_the_commands(tmp_path: Path) -> None:
    config = Config(server=ServerConfig(api_keys=("k",)), state_dir=tmp_path)
    lines = startup_lines(config, ["m"])
    assert "try: curl -s -H 'Authorization: Bearer KEY' http://127.0.0.1:8400/v1/models" in lines
    assert lines[-1].startswith(f"next: routerctl --state-dir {tmp_path} status")
