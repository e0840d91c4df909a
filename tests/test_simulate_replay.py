"""Replaying a host's own traffic: the trace and model table learned from its store
(request log, events, footprints), and ``routerd simulate`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from routerd.cli import main
from routerd.simulate.learn import fit_service, learn
from state import RequestEntry, RequestRow, Store, VersionSpec

T0 = 1_750_000_000.0
MB = 10**6


def _row(t: float, model: str | None, status: int = 200, **fields: object) -> RequestRow:
    values = {
        "ts": T0 + t,
        "tenant": None,
        "model": model,
        "version": "1" if model else None,
        "endpoint": "/v1/completions",
        "status": status,
        "error": None,
        "prompt_tokens": 8,
        "completion_tokens": 10,
        "waited_ms": None,
        "duration_ms": 120.0,
        **fields,
    }
    return RequestRow(**values)  # type: ignore[arg-type]


def host_state(state_dir: Path) -> Path:
    """A state directory as a daemon leaves it: versions, footprints, loads, requests."""
    store = Store.open(state_dir / "routerd.db", clock=lambda: T0)
    try:
        for name in ("a", "b", "c"):
            store.upsert_version(
                VersionSpec(name, "1", "transformers", f"/m/{name}", {"keep_alive": "10m"}),
                source="config",
            )
        parts = {"weights": 300 * MB, "runtime": 100 * MB, "working": 0}
        store.record_footprint("a", "1", "cuda", measured=parts, estimated_bytes=None)
        store.record_footprint("b", "1", "cpu", measured=parts, estimated_bytes=None)
        for duration, source in ((2000.0, "disk"), (1000.0, "disk"), (200.0, "host")):
            store.record_event(
                "load", "a", "1", duration_ms=duration, bytes=400 * MB, detail={"source": source}
            )
        store.record_event("load", "b", "1", duration_ms=500.0, detail={"source": "disk"})
        store.record_requests(
            [
                _row(0.0, "a", waited_ms=2000.0, duration_ms=2120.0),
                _row(5.0, "a", completion_tokens=20, duration_ms=220.0),
                _row(6.0, None, status=404),  # never reached a model
                _row(7.0, "b", status=503, completion_tokens=0, duration_ms=30_000.0),
                _row(9.0, "c"),  # c never loaded here: no footprint, no cost
                _row(12.0, "b"),
            ]
        )
    finally:
        store.close()
    return state_dir


def test_the_trace_and_table_come_from_the_store(tmp_path: Path) -> None:
    store = Store.open(host_state(tmp_path) / "routerd.db")
    try:
        learned = learn(store)
    finally:
        store.close()
    assert [(r.t, r.model, r.completion_tokens) for r in learned.trace] == [
        (0.0, "a@1", 10),
        (5.0, "a@1", 20),
        (7.0, "b@1", 0),
        (12.0, "b@1", 10),
    ]
    a, b = learned.costs["a@1"], learned.costs["b@1"]
    assert a.bytes == b.bytes == 400 * MB  # a's GPU footprint; b only ran on the CPU
    assert (a.load_s, a.host_s, b.load_s, b.host_s) == (1.5, 0.2, 0.5, None)
    # a's leases: 120 ms for 10 tokens, 220 ms for 20: 20 ms fixed, 10 ms a token.
    assert a.request_s == pytest.approx(0.02) and a.per_token_s == pytest.approx(0.01)
    assert learned.options["a@1"] == {"keep_alive": "10m"}
    assert learned.notes == [
        "c@1 left out with its 1 requests: no footprint was measured for it (it never loaded here)"
    ]


def test_the_since_bound_leaves_older_requests_out(tmp_path: Path) -> None:
    store = Store.open(host_state(tmp_path) / "routerd.db")
    try:
        learned = learn(store, since=T0 + 6.5)
        with pytest.raises(ValueError, match="no requests in that window"):
            learn(store, since=T0 + 100)
    finally:
        store.close()
    assert [(r.t, r.model) for r in learned.trace] == [(0.0, "b@1"), (5.0, "b@1")]


def _entry(tokens: int, duration_ms: float, waited_ms: float | None = None) -> RequestEntry:
    return RequestEntry(
        id=1,
        ts=T0,
        tenant=None,
        model="a",
        version="1",
        endpoint="/v1/completions",
        status=200,
        error=None,
        prompt_tokens=1,
        completion_tokens=tokens,
        waited_ms=waited_ms,
        duration_ms=duration_ms,
        stream_failed=False,
    )


def test_the_service_line_never_goes_below_zero() -> None:
    assert fit_service([]) == (0.0, 0.0)
    assert fit_service([_entry(4, 40.0), _entry(4, 60.0)]) == pytest.approx((0.0, 0.0125))
    # A steep line whose intercept would be negative goes through the origin instead.
    request_s, per_token_s = fit_service([_entry(10, 50.0), _entry(20, 200.0)])
    assert request_s == 0.0 and per_token_s == pytest.approx(0.0090, abs=1e-4)
    # What a request waited for its load is not the model's time.
    assert fit_service([_entry(0, 2100.0, waited_ms=2000.0)]) == pytest.approx((0.1, 0.0))


def test_routerd_simulate_replays_a_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = host_state(tmp_path / "state")
    code = main(["simulate", "--from-state", str(state), "--memory", "1GB", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["requests"] == 4 and report["models"] == 2
    assert [p["policy"] for p in report["policies"]] == ["cost", "belady"]  # the default
    assert report["policies"][0]["loads"] == 2 and report["notes"][0].startswith("c@1 left out")
    assert main(["simulate", "--from-state", str(state), "--memory", "1GB"]) == 0
    table = capsys.readouterr().out
    assert "belady (reference)" in table and "note: c@1 left out" in table


def test_a_generated_workload_saved_and_replayed_gives_the_same_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "saved"
    common = ["--memory", "40GB", "--json", "--policy", "lru"]
    generate = ["--generate", "bursty", "--requests", "300", "--model-count", "6", "--seed", "3"]
    assert main(["simulate", *generate, "--save", str(saved), *common]) == 0
    first = json.loads(capsys.readouterr().out)
    trace, models = saved / "trace.jsonl", saved / "models.json"
    assert len(trace.read_text().splitlines()) == 300
    assert main(["simulate", "--trace", str(trace), "--models", str(models), *common]) == 0
    again = json.loads(capsys.readouterr().out)
    figures = [{k: v for k, v in p.items() if k != "wall_seconds"} for p in first["policies"]]
    assert figures == [
        {k: v for k, v in p.items() if k != "wall_seconds"} for p in again["policies"]
    ]


def test_more_gpus_and_a_host_tier_change_what_the_simulation_loads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--gpus`` and ``--host-cache`` reach the simulated host: a second GPU holds
    more models (fewer loads), and a tier turns loads from disk into returns from RAM."""
    workload = ["--generate", "zipf", "--requests", "400", "--model-count", "8", "--seed", "2"]
    workload += ["--rate", "0.05", "--size", "10GB"]  # unhurried: every request is served
    common = [*workload, "--memory", "25GB", "--json", "--policy", "lru"]

    def figures(*extra: str) -> dict[str, Any]:
        assert main(["simulate", *common, *extra]) == 0
        report: dict[str, Any] = json.loads(capsys.readouterr().out)
        return dict(report["policies"][0])

    one = figures()
    two = figures("--gpus", "2")
    tiered = figures("--host-cache", "80GB")
    assert one["errors"] == two["errors"] == tiered["errors"] == {}
    assert two["loads"] < one["loads"]
    assert one["host_loads"] == 0 and tiered["host_loads"] > 0
    assert tiered["load_seconds"] < one["load_seconds"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from-state", "{tmp}/none"], "no routerd store at"),
        (["--trace", "{tmp}/trace.jsonl", "--models", "{tmp}/models.json"], "line 1: not JSON"),
        (["--generate", "zipf", "--memory", "lots"], "--memory: expected a size"),
        (["--generate", "zipf", "--policy", "fifo"], "unknown eviction policy 'fifo'"),
        (["--generate", "zipf", "--rate", "0"], "rate must be more than 0"),
    ],
)
def test_bad_input_exits_2_and_says_what(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "trace.jsonl").write_text("{oops\n")
    (tmp_path / "models.json").write_text('{"models": {"a": {"bytes": 1, "load_s": 1}}}')
    args = [a.format(tmp=tmp_path) for a in argv]
    assert main(["simulate", *args, "--requests", "10"]) == 2
    assert message in capsys.readouterr().err


def test_a_trace_file_is_costed_by_the_state_dir_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = host_state(tmp_path / "state")
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"t": 0, "model": "a@1"}\n{"t": 3, "model": "b@1"}\n')
    argv = ["simulate", "--trace", str(trace), "--state-dir", str(state), "--memory", "1GB"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"] == 2 and report["policies"][0]["loads"] == 2
    trace.write_text('{"t": 0, "model": "c@1"}\n')  # never loaded there
    assert main(argv) == 2
    assert "cannot cost c@1: no footprint was measured" in capsys.readouterr().err
