"""configs/: the example documents every key at its default; the dashboard's metrics exist."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from routerd.app import build_app
from routerd.config import (
    Config,
    DevicesConfig,
    MemoryAuditConfig,
    RequestLogConfig,
    SchedulerConfig,
    ServerConfig,
    load_config,
)
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_example_names_every_key_with_its_default() -> None:
    text = (CONFIGS / "example.toml").read_text()
    written = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    sections = (ServerConfig, SchedulerConfig, DevicesConfig, MemoryAuditConfig, RequestLogConfig)
    for section in sections:
        missing = {f.name for f in dataclasses.fields(section)} - written
        assert not missing, f"{section.__name__} keys missing from example.toml: {missing}"
    assert {"log_level", "log_format", "dir", "pinned", "max_queue"} <= written
    example = load_config(CONFIGS / "example.toml")
    defaults = Config()
    assert example.server == defaults.server
    assert example.scheduler == defaults.scheduler
    assert example.memory_audit == defaults.memory_audit
    assert example.request_log == defaults.request_log
    assert (example.log_level, example.log_format) == (defaults.log_level, defaults.log_format)


async def test_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    dashboard = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", n) for e in exprs for n in re.findall(r"routerd_\w+", e)
    }
    app = build_app(fake_services(tmp_path, FakeBackend(), [fake_spec(tmp_path, "a")]))
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/v1/completions", json={"model": "a", "prompt": "x"})).ok
        exposed = await (await client.get("/metrics")).text()
    families = set(re.findall(r"^# TYPE (\w+) ", exposed, flags=re.MULTILINE))
    families |= {f + "_total" for f in families}
    assert used and used <= families, used - families
