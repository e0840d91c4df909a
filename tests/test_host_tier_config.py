"""The host-RAM tier's configuration and how operators see it: ``[devices] host_cache``
parsed and checked against the host's RAM, the CPU budget beside it, and the tier in
``routerctl status``/``ps`` and the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from routerd.cli import main
from routerd.config import ConfigError, load_config
from routerd.ctl.display import format_ps, format_status
from routerd.devices import CPU_BUDGET_SHARE, HostMemoryTooSmall, cpu_budget_beside_tier
from routerd.metrics import Metrics
from tests.support import LedgerWatch, ask
from tests.test_host_tier import WEIGHTS, _services

GIB = 1024**3


def _meminfo(tmp: Path, total_gib: int, available_gib: int) -> Path:
    path = tmp / "meminfo"
    path.write_text(
        f"MemTotal: {total_gib * GIB // 1024} kB\nMemAvailable: {available_gib * GIB // 1024} kB\n"
    )
    return path


def _config(tmp: Path, devices: str) -> Path:
    path = tmp / "routerd.toml"
    path.write_text(f"[devices]\n{devices}\n")
    return path


def test_host_cache_is_a_size_and_off_by_default(tmp_path: Path) -> None:
    assert load_config(None).devices.host_cache == 0
    config = load_config(_config(tmp_path, 'host_cache = "16GiB"'))
    assert config.devices.host_cache == 16 * GIB
    with pytest.raises(ConfigError, match=r"devices\.host_cache"):
        load_config(_config(tmp_path, 'host_cache = "lots"'))
    with pytest.raises(ConfigError, match=r"devices\.host_cache"):
        load_config(_config(tmp_path, "host_cache = -1"))


def test_cpu_memory_and_host_cache_must_fit_the_host(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, total_gib=32, available_gib=24)
    cgroup = tmp_path / "no-cgroup"
    assert cpu_budget_beside_tier(16 * GIB, 8 * GIB, meminfo, cgroup) == 16 * GIB
    with pytest.raises(HostMemoryTooSmall, match="more than this host's"):
        cpu_budget_beside_tier(24 * GIB, 16 * GIB, meminfo, cgroup)
    # auto: the usual share of what is available once the tier is set aside
    auto = cpu_budget_beside_tier(None, 8 * GIB, meminfo, cgroup)
    assert auto == int(16 * GIB * CPU_BUDGET_SHARE)
    with pytest.raises(HostMemoryTooSmall, match="available"):
        cpu_budget_beside_tier(None, 24 * GIB, meminfo, cgroup)
    # without a tier nothing changes, whatever the host has
    assert cpu_budget_beside_tier(None, 0, meminfo, cgroup) is None
    assert cpu_budget_beside_tier(64 * GIB, 0, meminfo, cgroup) == 64 * GIB


def test_routerd_refuses_to_start_with_a_tier_the_host_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _config(tmp_path, 'cpu_memory = "1GiB"\nhost_cache = "1000000GiB"')
    assert main(["serve", "--config", str(path)]) == 2
    assert "devices.host_cache" in capsys.readouterr().err


async def test_status_ps_and_metrics_show_the_tier(tmp_path: Path) -> None:
    services, _ = _services(tmp_path, host_cache=10_000, watch=LedgerWatch())
    try:
        await ask(services, "a")
        await ask(services, "b")  # a rests in the tier
        tier = services.scheduler.host_tier()
        assert (tier.capacity_bytes, tier.used_bytes, tier.models) == (10_000, WEIGHTS, ("a@1",))
        instances = [{**i.__dict__, "progress": None} for i in services.scheduler.instances()]
        status = {
            "devices": [],
            "host_tier": {
                "capacity_bytes": tier.capacity_bytes,
                "used_bytes": tier.used_bytes,
                "models": list(tier.models),
            },
            "instances": instances,
        }
        assert "host tier: 3.9 KiB of 9.8 KiB (holds a@1)" in format_status(status)
        ps = format_ps(status)
        offloaded = next(line for line in ps.splitlines() if line.startswith("a@1"))
        assert "offloaded (3.9 KiB in host RAM)" in offloaded
        metrics = Metrics()
        metrics.attach(services.scheduler)
        text = metrics.render().decode()
        assert 'routerd_host_cache_bytes{kind="capacity"} 10000.0' in text
        assert f'routerd_host_cache_bytes{{kind="used"}} {float(WEIGHTS)}' in text
        assert 'routerd_resident_instances{device="cuda:0",state="offloaded"} 1.0' in text
    finally:
        await services.scheduler.close()
        services.store.close()
