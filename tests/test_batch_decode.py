"""Batched decoding in the transformers backend: every row as if it ran alone."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from backends import hf_batch, hf_cache
from backends.base import GenerationRow, LoadedModel, LoadSpec
from contract.errors import InvalidRequest
from contract.generation import Cancellation, Generation, GenerationResult, SamplingParams
from tests.fakes import FakeBackend

pytestmark = pytest.mark.usefixtures("strict_memory_audit")  # use beyond the estimate fails

TEXTS = (
    "def main(argv):\n    ",
    "Hello",
    "x",
    "import os",
    "class A:",
    "return None",
    "for i in range(10):\n        total += i",
    "# a longer comment about nothing in particular, padded out",
)


@dataclass
class Probe:
    """A row plus what its callbacks saw."""

    row: GenerationRow
    pieces: list[str] = field(default_factory=list)
    done: int = 0


def probe(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    on_piece: Callable[[Probe, str], None] | None = None,
) -> Probe:
    holder: list[Probe] = []

    def on_text(text: str) -> None:
        holder[0].pieces.append(text)
        if on_piece is not None:
            on_piece(holder[0], text)

    def on_done(row: GenerationRow) -> None:
        holder[0].done += 1

    p = Probe(GenerationRow(list(prompt_ids), params, on_text, on_done=on_done))
    holder.append(p)
    return p


def greedy(max_tokens: int, stop: Sequence[str] = ()) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=tuple(stop))


def alone(model: LoadedModel, p: Probe) -> GenerationResult:
    return model.generate(Generation(p.row.prompt_ids, p.row.params))


def finished(p: Probe) -> GenerationResult:
    """The row's result, checked against what it streamed and how often it finished."""
    assert p.done == 1
    assert p.row.error is None
    result = p.row.result
    assert result is not None
    assert "".join(p.pieces) == result.text
    assert all(p.pieces)
    return result


def queue_admit(
    joiners: dict[int, list[Probe]], seen: list[int] | None = None
) -> Callable[[int], list[GenerationRow]]:
    """An admit that hands over ``joiners[n]`` on its n-th call (1-based)."""
    calls = [0]

    def admit(free_slots: int) -> list[GenerationRow]:
        calls[0] += 1
        if seen is not None:
            seen.append(free_slots)
        return [p.row for p in joiners.pop(calls[0], [])]

    return admit


@pytest.fixture(scope="module")
def prompts(small_model: LoadedModel) -> list[list[int]]:
    return [small_model.encode_prompt(text) for text in TEXTS]


@pytest.fixture
def shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(rows, mask columns) of every forward pass the batch loop makes."""
    seen: list[tuple[int, int]] = []
    original = hf_batch._Batch._forward

    def spy(self: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any):
        seen.append((int(ids.shape[0]), int(mask.shape[1])))
        return original(self, ids, positions, mask, cache)

    monkeypatch.setattr(hf_batch._Batch, "_forward", spy)
    return seen


# -- greedy: batched == alone -----------------------------------------------------


def test_alone_matches_a_plain_greedy_reference(small_model: LoadedModel, prompts: list[list[int]]):
    """``generate`` (a batch of one) equals greedy decoding by full recomputation."""
    model: Any = getattr(small_model, "_model")  # noqa: B009 — the wrapped HF module
    decode: Any = getattr(small_model, "_decode")  # noqa: B009
    eos: frozenset[int] = getattr(small_model, "_eos_ids")  # noqa: B009
    for ids in prompts[:4]:
        sequence, produced = list(ids), []
        with torch.inference_mode():
            for _ in range(12):
                token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
                produced.append(token)
                if token in eos:
                    break
                sequence.append(token)
        result = small_model.generate(Generation(ids, greedy(12)))
        assert result.completion_tokens == len(produced)
        assert result.text == decode([t for t in produced if t not in eos])


def test_eight_rows_batched_equal_each_alone(small_model: LoadedModel, prompts: list[list[int]]):
    probes = [probe(ids, greedy(4 + 5 * i)) for i, ids in enumerate(prompts)]
    expected = [alone(small_model, p) for p in probes]
    small_model.generate_batch([p.row for p in probes], None)
    assert [finished(p) for p in probes] == expected
    assert {r.finish_reason for r in expected} >= {"length"}
    assert len({len(ids) for ids in prompts}) > 4  # the batch really was padded


def test_rows_joining_mid_decode_equal_alone(
    small_model: LoadedModel, prompts: list[list[int]], shapes: list[tuple[int, int]]
):
    first = [probe(prompts[0], greedy(20)), probe(prompts[1], greedy(6))]
    late = [probe(prompts[7], greedy(15)), probe(prompts[2], greedy(30))]
    expected = [alone(small_model, p) for p in first + late]
    shapes.clear()
    small_model.generate_batch([p.row for p in first], queue_admit({3: [late[0]], 7: [late[1]]}))
    assert [finished(p) for p in first + late] == expected
    # The joiners were prefilled on their own (a one-row pass wider than one token)
    # while the others were decoding, then decoded with them.
    prefills = [i for i, (rows, _) in enumerate(shapes) if i > 0 and rows == 1]
    assert prefills and max(rows for rows, _ in shapes) >= 2


def test_finished_rows_leave_and_padding_is_cut(
    small_model: LoadedModel, prompts: list[list[int]], shapes: list[tuple[int, int]]
):
    long_prompt, short_prompt = prompts[7], prompts[2]
    probes = [probe(long_prompt, greedy(2)), probe(short_prompt, greedy(12))]
    expected = [alone(small_model, p) for p in probes]
    shapes.clear()
    small_model.generate_batch([p.row for p in probes], None)
    results = [finished(p) for p in probes]
    assert results == expected
    assert results[1].completion_tokens > 4  # the short row outlived the long one
    # Once the long row left, the short row decodes alone over its own length only.
    rows, width = shapes[-1]
    assert rows == 1
    assert width == len(short_prompt) + results[1].completion_tokens - 1


def test_max_rows_bounds_what_admit_is_offered(
    small_model: LoadedModel, prompts: list[list[int]], shapes: list[tuple[int, int]]
):
    waiting = [probe(ids, greedy(6)) for ids in prompts[2:7]]
    queued = list(waiting)
    offered: list[int] = []

    def admit(free_slots: int) -> list[GenerationRow]:
        offered.append(free_slots)
        taken, queued[:] = queued[:free_slots], queued[free_slots:]
        return [p.row for p in taken]

    first = [probe(prompts[0], greedy(10)), probe(prompts[1], greedy(3))]
    shapes.clear()
    small_model.generate_batch([p.row for p in first], admit, max_rows=3)
    for p in first + waiting:
        assert finished(p) == alone(small_model, p)
    assert all(0 <= free <= 3 for free in offered)
    assert max(rows for rows, _ in shapes) <= 3


# -- per-row settings ---------------------------------------------------------------


def test_stop_strings_and_max_tokens_per_row(small_model: LoadedModel, prompts: list[list[int]]):
    free_run = [alone(small_model, probe(ids, greedy(24))) for ids in prompts]
    index = max(range(len(prompts)), key=lambda i: len(free_run[i].text))
    text = free_run[index].text
    stop = text[6:9]
    probes = [
        probe(prompts[index], greedy(24, stop=[stop, "\x00never"])),
        probe(prompts[index], greedy(3)),
        probe(prompts[0], greedy(24, stop=["zzzz-not-there"])),
        probe(prompts[3], greedy(1)),
    ]
    small_model.generate_batch([p.row for p in probes], None)
    stopped, short, unstopped, single = (finished(p) for p in probes)
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert stop not in "".join(probes[0].pieces)
    assert short.completion_tokens <= 3
    assert short == alone(small_model, probes[1])
    assert unstopped == free_run[0]
    assert single.completion_tokens == 1
    assert single == alone(small_model, probes[3])


def test_cancelling_one_row_leaves_the_others_unchanged(
    small_model: LoadedModel, prompts: list[list[int]]
):
    def cancel_after_three(p: Probe, _: str) -> None:
        if len(p.pieces) == 3:
            p.row.cancellation.cancel()

    free_run = [alone(small_model, probe(ids, greedy(30))) for ids in prompts]
    index = max(range(len(prompts)), key=lambda i: free_run[i].completion_tokens)
    victim = probe(prompts[index], greedy(30), on_piece=cancel_after_three)
    others = [probe(ids, greedy(30)) for i, ids in enumerate(prompts) if i != index][:4]
    rows = [others[0].row, others[1].row, victim.row, others[2].row, others[3].row]
    small_model.generate_batch(rows, None)
    cancelled = finished(victim)
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.completion_tokens < free_run[index].completion_tokens
    assert free_run[index].text.startswith(cancelled.text)
    for p in others:
        assert finished(p) == alone(small_model, p)


def test_a_row_cancelled_before_it_starts_finishes_at_once(
    small_model: LoadedModel, prompts: list[list[int]]
):
    early = probe(prompts[0], greedy(5))
    early.row.cancellation.cancel()
    other = probe(prompts[1], greedy(5))
    small_model.generate_batch([early.row, other.row], None)
    assert finished(early) == GenerationResult("", len(prompts[0]), 0, "cancelled")
    assert finished(other) == alone(small_model, other)


def test_seeded_sampling_does_not_depend_on_the_batch(
    small_model: LoadedModel, prompts: list[list[int]]
):
    def sampled(seed: int) -> Probe:
        params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=seed)
        return probe(prompts[0], params)

    seeds = (1, 2, 3)
    expected = [alone(small_model, sampled(seed)) for seed in seeds]
    # Together, with greedy neighbours, in another order, and joining late.
    together = [sampled(seed) for seed in seeds]
    neighbours = [probe(ids, greedy(8)) for ids in prompts[3:6]]
    mixed = [neighbours[0], together[2], neighbours[1], together[0], together[1], neighbours[2]]
    small_model.generate_batch([p.row for p in mixed], None)
    assert [finished(p) for p in together] == expected
    late = [sampled(seed) for seed in seeds]
    small_model.generate_batch([late[1].row], queue_admit({2: [late[0]], 5: [late[2]]}))
    assert [finished(p) for p in late] == expected
    assert len({r.text for r in expected}) > 1  # the seeds really differ


# -- failures -----------------------------------------------------------------------


def test_a_failing_row_fails_alone(small_model: LoadedModel, prompts: list[list[int]]):
    vocab = small_model.info.vocab_size

    def explode(p: Probe, _: str) -> None:
        if len(p.pieces) == 2:
            raise RuntimeError("client sink broke")

    bad_ids = probe([1, vocab + 5], greedy(5))
    empty = probe([], greedy(5))
    broken_sink = probe(prompts[0], greedy(20), on_piece=explode)
    good = [probe(prompts[1], greedy(12)), probe(prompts[4], greedy(12))]
    late_bad = probe([vocab], greedy(5))
    admit = queue_admit({2: [late_bad]})
    small_model.generate_batch([bad_ids.row, good[0].row, broken_sink.row, empty.row], admit)
    small_model.generate_batch([good[1].row], None)
    for p in (bad_ids, empty, late_bad):
        assert p.done == 1 and p.row.result is None
        assert isinstance(p.row.error, InvalidRequest)
    assert broken_sink.done == 1 and broken_sink.row.result is None
    assert isinstance(broken_sink.row.error, RuntimeError)
    for p in good:
        assert finished(p) == alone(small_model, p)


def test_generate_raises_what_its_row_failed_with(small_model: LoadedModel):
    def boom(_: str) -> None:
        raise RuntimeError("sink broke")

    ids = small_model.encode_prompt("Hello")
    with pytest.raises(RuntimeError, match="sink broke"):
        small_model.generate(Generation(ids, greedy(5), boom, Cancellation()))
    with pytest.raises(InvalidRequest):
        small_model.generate(Generation([small_model.info.vocab_size], greedy(5)))


# -- the fake backend's batches --------------------------------------------------------


def test_fake_model_runs_rows_and_admits_until_none(tmp_path: Any) -> None:
    backend = FakeBackend()
    model = backend.load(LoadSpec("f", "1", str(tmp_path), {}, "cpu"))
    first = probe(list(b"ab"), SamplingParams(max_tokens=3))
    joiner = probe(list(b"cd"), SamplingParams(max_tokens=2))
    model.generate_batch([first.row], queue_admit({1: [joiner]}))
    assert finished(first).text == "bab"
    assert finished(joiner).text == "dc"


def test_rows_arriving_together_are_prefilled_a_context_at_a_time(
    small_model: LoadedModel, prompts: list[list[int]], shapes: list[tuple[int, int]]
):
    """The instance's working memory was measured on one full-context pass, so rows that
    arrive together are prefilled in passes of at most a context's padded tokens — and
    each still decodes as it would alone."""
    context = small_model.info.context_length
    long_prompts = [(ids * (context // len(ids)))[: context // 3 + 50] for ids in prompts[:4]]
    probes = [probe(ids, greedy(3)) for ids in long_prompts]
    expected = [alone(small_model, p) for p in probes]
    shapes.clear()
    small_model.generate_batch([p.row for p in probes], None)
    assert [finished(p) for p in probes] == expected
    width = context // 3 + 50
    prefills = [(rows, columns) for rows, columns in shapes if columns >= width]
    prefills = [shape for shape in prefills if shape[1] == width]  # passes over whole prompts
    assert [rows for rows, _ in prefills] == [2, 2]  # three rows would exceed one context
    assert all(rows * columns <= context for rows, columns in prefills)


def test_a_prefill_group_takes_what_one_context_holds() -> None:
    from types import SimpleNamespace

    def seqs(*lengths: int) -> list[Any]:
        return [SimpleNamespace(row=SimpleNamespace(prompt_ids=[1] * n)) for n in lengths]

    group = hf_batch._prefill_group
    assert len(group(seqs(10, 10, 10), 30)) == 3
    assert len(group(seqs(10, 10, 11), 30)) == 2  # 3 × 11 padded tokens
    assert len(group(seqs(5, 20, 1), 30)) == 1  # the second row pads the pair to 40
    assert len(group(seqs(40, 1), 30)) == 1  # a row alone always goes (the context bounds it)


# -- the running batch's cache and the memory it gives back ---------------------------


def test_a_cache_that_grows_in_small_steps_still_decodes_every_row_as_alone(
    small_model: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
):
    """With room for only three columns the cache is moved, joined, cut and narrowed
    many times over; every row still decodes as it would alone."""
    monkeypatch.setattr(hf_cache, "DEFAULT_ROOM", 3)
    placed: list[int] = []
    original = hf_cache.GrowingLayer._place

    def spy(self: Any, keys: torch.Tensor, values: torch.Tensor, more: int) -> None:
        placed.append(self.limit)
        original(self, keys, values, more)

    monkeypatch.setattr(hf_cache.GrowingLayer, "_place", spy)
    first = [probe(prompts[0], greedy(20)), probe(prompts[7], greedy(3))]
    late = [probe(prompts[2], greedy(25)), probe(prompts[4], greedy(9))]
    expected = [alone(small_model, p) for p in first + late]
    placed.clear()
    small_model.generate_batch([p.row for p in first], queue_admit({2: [late[0]], 5: [late[1]]}))
    assert [finished(p) for p in first + late] == expected
    model: Any = getattr(small_model, "_model")  # noqa: B009 — the wrapped HF module
    layers = int(model.config.num_hidden_layers)
    assert len(placed) >= 4 * layers  # room ran out several times in every layer
    ceiling = max(len(p.row.prompt_ids) + p.row.params.max_tokens for p in first + late)
    assert max(placed) <= ceiling  # and never reached past what the rows can need


def test_memory_is_given_back_after_long_prefills_and_when_rows_leave(
    small_model: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
):
    releases: list[str] = []
    monkeypatch.setattr(small_model, "_release_memory", lambda: releases.append("release"))
    context = small_model.info.context_length
    long_prompt = (prompts[6] * context)[: hf_batch.RELEASE_AFTER_TOKENS + 10]
    short = probe(prompts[1], greedy(2))
    small_model.generate_batch([short.row], None)
    finished(short)
    assert releases == ["release"]  # a short prefill gives nothing back; the drain does
    releases.clear()
    rows = [probe(long_prompt, greedy(2)), probe(prompts[3], greedy(6))]
    small_model.generate_batch([p.row for p in rows], None)
    for p in rows:
        finished(p)
    # After the long prefill's pass and after its merge, when one row left, at the drain.
    assert len(releases) == 4
