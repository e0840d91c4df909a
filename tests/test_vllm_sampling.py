"""The vllm backend's sampling: routerd's fields as vLLM's, and vLLM's log-probabilities
in the contract's shape.

The mapping and the conversion are pure and tested with hand-built stand-ins for
vLLM's output objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from backends.vllm_sampling import (
    ENGINE_ARGS,
    MAX_LOGPROBS,
    OutputReader,
    TokenTexts,
    drops_output,
    position_logprob,
    prompt_logprobs,
    sample_logprobs,
    sampling_kwargs,
)
from contract.errors import BackendError
from contract.generation import (
    DEFAULTS,
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

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
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
