"""The simulator's inputs and its clock: virtual-time loop, traces, model tables, generators."""

from __future__ import annotations

import asyncio
import io
import itertools
import statistics
from collections import Counter
from pathlib import Path

import pytest

from routerd.simulate.costs import ModelCost, parse_table, read_table, table_json
from routerd.simulate.generate import GB, Workload, costs_for, generate
from routerd.simulate.loop import LoopTimeClock, Stalled, VirtualTimeLoop
from routerd.simulate.trace import (
    TraceError,
    TraceRequest,
    load_trace,
    read_trace,
    split_model,
    write_trace,
)

# -- the loop -----------------------------------------------------------------------


def test_an_hour_of_sleep_takes_no_time_and_timers_fire_in_order() -> None:
    loop = VirtualTimeLoop(start=50.0)
    fired: list[tuple[str, float]] = []

    async def main() -> None:
        loop.call_later(7200, lambda: fired.append(("late", loop.time())))
        loop.call_later(10, lambda: fired.append(("early", loop.time())))
        await asyncio.sleep(3600)
        fired.append(("slept", loop.time()))

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert fired == [("early", pytest.approx(60.0)), ("slept", pytest.approx(3650.0))]


def test_executor_work_lasts_what_it_says_and_its_effect_comes_at_the_end() -> None:
    loop = VirtualTimeLoop()
    clock = LoopTimeClock(loop, wall_start=1000.0)
    held: list[str] = []

    def work() -> str:
        loop.takes(2.5, lambda: held.append(f"freed at {loop.time():g}"))
        return "done"

    async def main() -> tuple[str, float]:
        result = await loop.run_in_executor(None, work)
        return result, clock.now()

    try:
        result, finished = loop.run_until_complete(main())
    finally:
        loop.close()
    assert (result, finished) == ("done", 2.5)
    assert held == ["freed at 2.5"]
    assert clock.wall() == pytest.approx(1002.5)


def test_work_that_raises_raises_into_its_awaiter_after_its_time() -> None:
    loop = VirtualTimeLoop()

    def broken() -> None:
        loop.takes(1.0)
        raise OSError("disk gone")

    async def main() -> float:
        with pytest.raises(OSError, match="disk gone"):
            await loop.run_in_executor(None, broken)
        return loop.time()

    try:
        assert loop.run_until_complete(main()) == 1.0
    finally:
        loop.close()


def test_waiting_for_something_no_timer_brings_is_reported_not_hung() -> None:
    loop = VirtualTimeLoop()

    async def main() -> None:
        await asyncio.Event().wait()

    try:
        with pytest.raises(Stalled):
            loop.run_until_complete(main())
    finally:
        loop.close()


# -- traces ---------------------------------------------------------------------------


def test_a_trace_reads_in_time_order_and_writes_back_the_same(tmp_path: Path) -> None:
    text = (
        '{"t": 2.5, "model": "b", "prompt_tokens": 10, "completion_tokens": 3}\n'
        "\n"
        '{"t": 0, "model": "a@2"}\n'
    )
    path = tmp_path / "trace.jsonl"
    path.write_text(text)
    trace = read_trace(path)
    assert trace == [TraceRequest(0.0, "a@2", 0, 1), TraceRequest(2.5, "b", 10, 3)]
    out = io.StringIO()
    write_trace(trace, out)
    assert load_trace(out.getvalue().splitlines()) == trace
    assert split_model("a@2") == ("a", "2") and split_model("b") == ("b", "1")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"t": -1, "model": "a"}', "line 2: 't' must be"),
        ('{"t": 1, "model": ""}', "line 2: 'model' must be"),
        ('{"t": 1, "model": "a", "prompt_tokens": 1.5}', "line 2: 'prompt_tokens'"),
        ('{"t": 1, "model": "a", "tenant": "x"}', "line 2: unknown field"),
    ],
)
def test_a_bad_trace_line_is_refused_with_its_number(line: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_trace(['{"t": 0, "model": "a"}', line])


def test_an_empty_or_missing_trace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no requests"):
        load_trace(["", " "])
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "nothing.jsonl")


# -- model tables ---------------------------------------------------------------------


def test_a_model_table_takes_sizes_in_words_and_round_trips(tmp_path: Path) -> None:
    table = parse_table({"models": {"big": {"bytes": "14GiB", "load_s": 9.5, "per_token_s": 0.02}}})
    assert table["big"] == ModelCost(bytes=14 * 1024**3, load_s=9.5, per_token_s=0.02)
    assert table["big"].restore_s == pytest.approx(0.95)  # a tenth of a load by default
    assert table["big"].serve_s(100) == pytest.approx(2.0)
    path = tmp_path / "models.json"
    path.write_text(__import__("json").dumps(table_json(table)))
    assert read_table(path) == table


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "expected"),
        ({"models": {}}, "no models"),
        ({"models": {"a": {"load_s": 1}}}, "'bytes' and 'load_s' are required"),
        ({"models": {"a": {"bytes": "lots", "load_s": 1}}}, "a size such as"),
        ({"models": {"a": {"bytes": 0, "load_s": 1}}}, "more than 0"),
        ({"models": {"a": {"bytes": 1, "load_s": -1}}}, "load_s: must be finite and >= 0"),
        ({"models": {"a": {"bytes": 1, "load_s": 1, "colour": "red"}}}, "unknown field"),
    ],
)
def test_a_bad_model_table_is_refused_naming_the_field(raw: object, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_table(raw)


# -- generators -----------------------------------------------------------------------


def test_a_workload_is_repeatable_and_zipf_favours_the_first_models() -> None:
    workload = Workload(kind="zipf", requests=4000, models=8, rate=4.0, alpha=1.2, seed=3)
    trace = generate(workload)
    assert trace == generate(workload)
    assert trace != generate(Workload(kind="zipf", requests=4000, models=8, seed=4))
    assert len(trace) == 4000 and [r.t for r in trace] == sorted(r.t for r in trace)
    counts = Counter(r.model for r in trace)
    assert counts["model-0"] > counts["model-1"] > counts["model-4"]
    assert statistics.fmean(b.t - a.t for a, b in itertools.pairwise(trace)) == (
        pytest.approx(1 / workload.rate, rel=0.1)
    )


def test_bursty_traffic_comes_in_spells_and_shift_changes_the_favourite() -> None:
    bursty = generate(Workload(kind="bursty", requests=6000, models=4, rate=2.0, seed=1))
    steady = generate(Workload(kind="zipf", requests=6000, models=4, rate=2.0, seed=1))

    def dispersion(trace: list[TraceRequest], model: str) -> float:
        """Variance over mean of a model's requests per minute: 1 for Poisson."""
        per_minute = Counter(int(r.t // 60) for r in trace if r.model == model)
        counts = [per_minute.get(m, 0) for m in range(int(trace[-1].t // 60))]
        return statistics.pvariance(counts) / statistics.fmean(counts)

    assert dispersion(bursty, "model-0") > 3 * dispersion(steady, "model-0")
    shifting = generate(
        Workload(kind="shift", requests=8000, models=10, rate=4.0, shift_every=500.0, seed=2)
    )
    favourites = {
        Counter(r.model for r in shifting if int(r.t // 500) == period).most_common(1)[0][0]
        for period in range(3)
    }
    assert len(favourites) > 1


def test_mixed_sizes_stay_in_range_and_larger_models_cost_more() -> None:
    table = costs_for(Workload(sizes="mixed", models=30, seed=5))
    sizes = [c.bytes for c in table.values()]
    assert min(sizes) >= GB // 2 and max(sizes) <= 70 * GB and len(set(sizes)) == 30
    by_size = sorted(table.values(), key=lambda c: c.bytes)
    assert by_size[0].load_s < by_size[-1].load_s
    assert by_size[0].restore_s < by_size[-1].restore_s < by_size[-1].load_s
    assert {c.bytes for c in costs_for(Workload(models=3)).values()} == {14 * GB}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "poisson"}, "unknown workload"),
        ({"sizes": "huge"}, "unknown sizes"),
        ({"requests": 0}, "requests must be at least 1"),
        ({"rate": 0.0}, "rate must be more than 0"),
        ({"min_size": 10, "max_size": 5}, "min_size at most max_size"),
    ],
)
def test_a_workload_that_cannot_be_made_says_why(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(Workload(**change))  # type: ignore[arg-type]


def test_a_cost_spread_makes_load_times_differ_from_what_bytes_say() -> None:
    plain = costs_for(Workload(sizes="mixed", models=20, seed=9))
    spread = costs_for(Workload(sizes="mixed", models=20, seed=9, cost_spread=8.0))
    assert [c.bytes for c in plain.values()] == [c.bytes for c in spread.values()]
    ratios = [spread[m].load_s / plain[m].load_s for m in plain]
    assert all(1 / 8 - 1e-3 <= r <= 8 + 1e-3 for r in ratios)
    assert max(ratios) / min(ratios) > 4  # not one factor for all
    with pytest.raises(ValueError, match="cost_spread"):
        generate(Workload(cost_spread=0.5))
