"""Configuration: embedded defaults, TOML overrides, state-dir precedence, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from backends.registry import BackendRegistry
from routerd.config import (
    Config,
    ConfigError,
    RequestLogConfig,
    default_state_dir,
    load_config,
    parse_duration,
    parse_size,
)
from routerd.version_options import SCHEDULER_OPTIONS


def test_defaults_need_no_file():
    config = load_config(None)
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8400
    assert config.models == ()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ROUTERD_STATE_DIR": "/a", "STATE_DIRECTORY": "/b", "XDG_STATE_HOME": "/c"}, "/a"),
        ({"STATE_DIRECTORY": "/b:/other", "XDG_STATE_HOME": "/c"}, "/b"),
        ({"XDG_STATE_HOME": "/c", "HOME": "/home/u"}, "/c/routerd"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/routerd"),
    ],
)
def test_state_dir_precedence(env, expected):
    assert default_state_dir(env) == Path(expected)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("30d", 30 * 86400),
        ("7", 7),
        (3, 3),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text, key="k") == seconds


def test_bad_duration_names_the_key():
    with pytest.raises(ConfigError, match=r"server\.shutdown_timeout"):
        parse_duration("soon", key="server.shutdown_timeout")


def test_file_overrides_and_models(tmp_path):
    model_dir = tmp_path / "weights"
    model_dir.mkdir()
    path = tmp_path / "routerd.toml"
    path.write_text(
        """
log_level = "debug"
[server]
port = 9000
shutdown_timeout = "5s"
[state]
dir = "state"
[[models]]
name = "m"
version = "2"
path = "weights"
[models.options]
dtype = "bfloat16"
"""
    )
    config = load_config(path)
    assert config.server.port == 9000
    assert config.server.host == "127.0.0.1"
    assert config.server.shutdown_timeout == 5
    assert config.state_dir == tmp_path / "state"
    assert config.log_level == "debug"
    (model,) = config.models
    assert (model.name, model.version, model.backend) == ("m", "2", "transformers")
    assert model.path == str(model_dir)
    assert model.options == {"dtype": "bfloat16"}
    assert config.source_file == path


def test_flags_win_over_the_file(tmp_path):
    config = Config().with_overrides(port=1234, host="0.0.0.0", state_dir=tmp_path, demo=None)
    assert (config.server.port, config.server.host, config.state_dir) == (1234, "0.0.0.0", tmp_path)
    assert config.demo is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown key server.prot"),
        ("[server]\nport = 'x'\n", "server.port"),
        ("[server]\nport = 70000\n", "not a TCP port"),
        ("[[models]]\nname = 'm'\n", "missing required key 'path'"),
        ("[[models]]\nname='m'\npath='/x'\n[[models]]\nname='m'\npath='/y'\n", "declared twice"),
        ("log_level = 'loud'\n", "log_level"),
        ("this is not toml", "invalid TOML"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_shipped_configs_load():
    repo = Path(__file__).resolve().parent.parent
    defaults = load_config(repo / "configs" / "default.toml")
    assert defaults.server == Config().server
    assert defaults.scheduler == Config().scheduler
    assert defaults.memory_audit == Config().memory_audit
    assert defaults.request_log == Config().request_log
    example = load_config(repo / "configs" / "example.toml")
    assert [m.name for m in example.models] == ["my-llm", "my-vllm-llm", "my-vllm-embedder"]
    vllm = example.models[1]
    assert vllm.backend == "vllm"
    backend_options = {k: v for k, v in vllm.options.items() if k not in SCHEDULER_OPTIONS}
    assert BackendRegistry().validate_options(vllm.backend, backend_options)["enable_sleep_mode"]
    embedder = example.models[2]
    options = BackendRegistry().validate_options(embedder.backend, dict(embedder.options))
    assert (options["task"], options["pooling"]) == ("embed", "mean")


def test_devices_and_scheduler_sections(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        """
[scheduler]
keep_alive = -1
min_residency = "0s"
placement = "spread"
eviction = "cost"
history_half_life_requests = 250
[devices]
cpu_memory = "512MiB"
gpus = [1]
gpu_headroom = "1GiB"
cpu_allocation = "Pooled"
[[models]]
name = "m"
path = "/m"
keep_alive = "10m"
devices = ["cuda", "cpu"]
pinned = true
"""
    )
    config = load_config(path)
    assert math.isinf(config.scheduler.keep_alive)
    assert config.scheduler.min_residency == 0
    assert config.scheduler.placement == "spread"
    assert config.scheduler.eviction == "cost"
    assert config.scheduler.history_half_life_requests == 250
    assert load_config(None).scheduler.history_half_life_requests == 1000
    assert config.devices.cpu_memory == 512 * 1024**2
    assert config.devices.gpus == (1,)
    assert config.devices.gpu_headroom == 1024**3
    assert config.devices.cpu_allocation == "pooled"
    assert load_config(None).devices.cpu_allocation == "exact"
    assert config.models[0].options == {"keep_alive": "10m", "devices": ["cuda", "cpu"]}
    assert config.pinned == {"m@1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[scheduler]\nplacement = 'worst-fit'\n", "best-fit"),
        ("[scheduler]\neviction = 'random'\n", "lru"),
        ("[scheduler]\nkeep_alive = -5\n", "never"),
        ("[scheduler]\nhistory_half_life_requests = 0\n", "at least 1"),
        ("[scheduler]\nhistory_half_life_requests = '1h'\n", "expected an integer"),
        ("[scheduler]\nhistory_half_life = '1h'\n", "history_half_life"),
        ("[devices]\ncpu_memory = 'lots'\n", "devices.cpu_memory"),
        ("[devices]\ngpus = 'some'\n", "devices.gpus"),
        ("[devices]\ncpu_allocation = 'tcmalloc'\n", "devices.cpu_allocation: expected one of"),
    ],
)
def test_bad_scheduling_settings(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "size"), [("8GiB", 8 * 1024**3), ("512MiB", 512 * 1024**2), ("2GB", 2 * 10**9), (7, 7)]
)
def test_sizes(text, size):
    assert parse_size(text, key="k") == size


def test_scheduler_settings_carry_every_scheduler_and_device_setting_they_share():
    from routerd.config import DevicesConfig, SchedulerConfig
    from routerd.scheduler.settings import SchedulerSettings

    scheduler = SchedulerConfig(
        load_timeout=1.0,
        load_wait_timeout=2.0,
        min_residency=3.0,
        keep_alive=4.0,
        release_timeout=5.0,
        routing="round-robin",
        max_queue=6,
        max_failures=7,
        stop_timeout=8.0,
        history_half_life_requests=12.0,
    )
    devices = DevicesConfig(poll_interval=9.0, gpu_headroom=10, cpu_headroom=11)
    settings = SchedulerSettings.from_config(scheduler, devices)
    assert settings == SchedulerSettings(
        load_timeout=1.0,
        load_wait_timeout=2.0,
        min_residency=3.0,
        keep_alive=4.0,
        release_timeout=5.0,
        routing="round-robin",
        max_queue=6,
        max_failures=7,
        stop_timeout=8.0,
        history_half_life_requests=12.0,
        poll_interval=9.0,
        headroom={"cuda": 10, "cpu": 11},
    )


def test_request_log_defaults_and_table(tmp_path):
    defaults = load_config(None).request_log
    assert defaults == RequestLogConfig(
        enabled=True, max_rows=1_000_000, max_age=30 * 86400.0, flush_interval=1.0
    )
    path = tmp_path / "routerd.toml"
    path.write_text(
        "[request_log]\nenabled = false\nmax_rows = 500\nmax_age = '12h'\n"
        "flush_interval = '250ms'\n"
    )
    assert load_config(path).request_log == RequestLogConfig(
        enabled=False, max_rows=500, max_age=12 * 3600.0, flush_interval=0.25
    )
    path.write_text("[request_log]\nmax_rows = 0\nmax_age = 0\n")  # 0: no limit
    unlimited = load_config(path).request_log
    assert (unlimited.max_rows, unlimited.max_age) == (0, math.inf)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[request_log]\nmax_row = 5\n", "unknown key request_log.max_row"),
        ("[request_log]\nenabled = 'yes'\n", "request_log.enabled: expected true or false"),
        ("[request_log]\nmax_rows = -1\n", "request_log.max_rows: must be 0"),
        ("[request_log]\nmax_rows = '1M'\n", "request_log.max_rows: expected an integer"),
        ("[request_log]\nmax_age = 'forever'\n", "request_log.max_age: expected a duration"),
        ("[request_log]\nmax_age = '-1d'\n", "request_log.max_age: must be 0"),
        ("[request_log]\nflush_interval = 0\n", "request_log.flush_interval: must be positive"),
        ("request_log = 3\n", r"request_log: expected a table"),
    ],
)
def test_bad_request_log_settings_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
