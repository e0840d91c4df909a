"""A request's choices below HTTP (``routerd.serving.choices``) and as the APIs write
them (``routerd.api.choices``), with a scripted handle instead of a model."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import pytest

from contract.generation import (
    GenerationResult,
    Logprob,
    ModelInfo,
    SamplingParams,
    Task,
    asked_fields,
)
from routerd.api.choices import (
    Asked,
    Echo,
    StreamedMessage,
    StreamedText,
    chat_entry,
    completion_logprobs,
    first_prompt_entry,
    text_choice,
    vllm_prompt_logprobs,
)
from routerd.serving.choices import Row, best_of, expand, generate_rows, stream_rows, usage
from routerd.serving.handle import Embedding, Finished, PrepareInputs
from routerd.serving.prompts import PreparedPrompt


def entry(token_id: int, token: str, logprob: float, *top: tuple[int, str, float]) -> Logprob:
    return Logprob(token_id, token, logprob, [Logprob(i, t, lp) for i, t, lp in top])


def result(text: str, *logprobs: float, prompt_tokens: int = 3) -> GenerationResult:
    entries = [entry(i, "t", lp) for i, lp in enumerate(logprobs)]
    return GenerationResult(text, prompt_tokens, len(logprobs), "length", logprobs=entries)


class ScriptedHandle:
    """A ModelHandle whose rows wait until ``release`` is set, so a test sees which
    rows run at the same time; a seed of 13 fails its row."""

    def __init__(self, expected_rows: int) -> None:
        self.started: list[int | None] = []
        self.stopped: list[int | None] = []
        self.all_started = asyncio.Event()
        self.expected = expected_rows

    info = ModelInfo(Task.GENERATE, 64, "cpu", "float32")
    device = "cpu"
    max_tokens = None

    async def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    async def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return [1]

    async def decode_tokens(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    async def _begin(self, params: SamplingParams) -> None:
        self.started.append(params.seed)
        if len(self.started) == self.expected:
            self.all_started.set()
        try:
            await self.all_started.wait()
            if params.seed == 13:
                raise RuntimeError("row 13 failed")
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.stopped.append(params.seed)
            raise

    async def generate(self, token_ids: list[int], params: SamplingParams) -> GenerationResult:
        await self._begin(params)
        if params.seed == 12:  # the slow row: still running when 13 fails
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.stopped.append(params.seed)
                raise
        return GenerationResult(f"seed {params.seed}", len(token_ids), 1, "length")

    async def stream(
        self, token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[str | Logprob | Finished, None]:
        await self._begin(params)
        yield Logprob(7, "a", -0.5)
        yield f"a{params.seed}"
        if params.seed == 12:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.stopped.append(params.seed)
                raise
        yield Finished(GenerationResult(f"a{params.seed}", len(token_ids), 1, "stop"))

    async def embed(self, prepare: PrepareInputs, tokens: int) -> Embedding:
        raise AssertionError("not used")


def prompt(seed: int | None, ids: Sequence[int] = (1, 2, 3)) -> PreparedPrompt:
    return PreparedPrompt(list(ids), SamplingParams(max_tokens=4, seed=seed))


# -- rows ----------------------------------------------------------------------------


def test_a_copy_of_sampling_params_keeps_every_field() -> None:
    changed = {
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.5,
        "seed": 9,
        "stop": ("x",),
        "top_k": 2,
        "min_p": 0.1,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.1,
        "logit_bias": {1: 2.0},
        "allowed_token_ids": [1],
        "ignore_eos": True,
        "min_tokens": 1,
        "stop_token_ids": (4,),
        "include_stop_str_in_output": True,
        "logprobs": 2,
        "prompt_logprobs": 1,
    }
    assert set(changed) == set(SamplingParams.__slots__)
    original = SamplingParams(**changed)
    copy = original.copy()
    assert copy == original and copy is not original
    assert asked_fields(original) == [n for n in SamplingParams.__slots__ if n != "max_tokens"]
    assert asked_fields(original, among={"top_k", "seed"}) == ["seed", "top_k"]


def test_each_prompt_gets_its_rows_in_order_with_consecutive_seeds() -> None:
    rows = expand([prompt(10), prompt(None, (9,))], 3)
    assert [r.prompt_index for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r.prompt.params.seed for r in rows] == [10, 11, 12, None, None, None]
    assert rows[0].prompt.params.seed == 10  # the first row keeps the asked seed
    wrapped = expand([prompt(2**64 - 1)], 2)
    assert [r.prompt.params.seed for r in wrapped] == [2**64 - 1, 0]


async def test_rows_run_together_and_come_back_in_order() -> None:
    handle = ScriptedHandle(expected_rows=3)
    results = await asyncio.wait_for(generate_rows(handle, expand([prompt(1)], 3)), 5)
    assert [r.text for r in results] == ["seed 1", "seed 2", "seed 3"]
    assert sorted(s for s in handle.started if s is not None) == [1, 2, 3]


async def test_a_failing_row_stops_the_others_before_it_is_raised() -> None:
    handle = ScriptedHandle(expected_rows=3)
    with pytest.raises(RuntimeError, match="row 13 failed"):
        await asyncio.wait_for(generate_rows(handle, expand([prompt(11)], 3)), 5)
    assert 12 in handle.stopped  # the slow row did not outlive the request


class PromptScoringHandle(ScriptedHandle):
    """Generates at once; a row that asks for prompt logprobs gets them (and is counted)."""

    def __init__(self) -> None:
        super().__init__(expected_rows=0)
        self.scored: list[list[int]] = []

    async def generate(self, token_ids: list[int], params: SamplingParams) -> GenerationResult:
        entries: list[Logprob | None] | None = None
        if params.prompt_logprobs is not None:
            self.scored.append(token_ids)
            entries = [None, *(Logprob(t, chr(t), -1.0) for t in token_ids[1:])]
        return GenerationResult("x", len(token_ids), 1, "length", prompt_logprobs=entries)


async def test_a_prompts_logprobs_are_computed_once_and_shared_by_its_choices() -> None:
    handle = PromptScoringHandle()
    scored = [
        PreparedPrompt(ids, SamplingParams(max_tokens=1, prompt_logprobs=0, seed=5))
        for ids in ([1, 2], [3, 4, 5])
    ]
    rows = expand(scored, 3)
    assert [r.prompt.params.prompt_logprobs for r in rows] == [0, None, None] * 2
    results = await generate_rows(handle, rows)
    assert handle.scored == [[1, 2], [3, 4, 5]]  # once per prompt, not once per choice
    assert [len(r.prompt_logprobs or []) for r in results] == [2, 2, 2, 3, 3, 3]
    assert results[1].prompt_logprobs is results[0].prompt_logprobs


def test_best_of_keeps_the_most_likely_choices_most_likely_first() -> None:
    results = [result("a", -3.0, -1.0), result("b", -0.5), result("c", -1.0, -0.1)]
    assert best_of(results, 2) == [1, 2]


def test_usage_counts_each_prompt_once_and_every_row_generated() -> None:
    rows = expand([prompt(None), prompt(None, (5,))], 2)
    results = [result("x", -1.0, -1.0, prompt_tokens=3)] * 2 + [
        result("y", -1.0, prompt_tokens=1)
    ] * 2
    assert usage(rows, results) == (4, 6)


async def test_streamed_rows_interleave_and_leaving_early_stops_every_row() -> None:
    handle = ScriptedHandle(expected_rows=2)
    rows = [Row(0, prompt(11)), Row(0, prompt(12))]
    seen: list[tuple[int, Any]] = []

    async def read_until_the_first_finishes() -> None:
        stream = stream_rows(handle, rows)
        async for index, item in stream:
            seen.append((index, item))
            if isinstance(item, Finished):  # row 0 is done; row 1 waits forever
                break
        await stream.aclose()

    await asyncio.wait_for(read_until_the_first_finishes(), 5)
    assert 12 in handle.stopped  # closing the stream stopped the row still running
    assert (0, "a11") in seen and (1, "a12") in seen
    firsts = {i: next(item for j, item in seen if j == i) for i in (0, 1)}
    assert all(isinstance(item, Logprob) for item in firsts.values())  # before its text


async def test_a_failing_streamed_row_fails_the_stream() -> None:
    handle = ScriptedHandle(expected_rows=2)
    rows = [Row(0, prompt(12)), Row(0, prompt(13))]
    with pytest.raises(RuntimeError, match="row 13 failed"):
        async for _ in stream_rows(handle, rows):
            pass


# -- as the APIs write them ---------------------------------------------------------------


def test_completion_logprobs_list_tokens_offsets_and_alternatives() -> None:
    entries = [
        first_prompt_entry(1, "He"),
        entry(2, "llo", -0.25, (2, "llo", -0.25), (9, "lp", -2.0)),
        entry(3, "!", -math.inf, (4, "?", -0.1)),
    ]
    written = completion_logprobs(entries, top=1, as_ids=False)
    assert written["tokens"] == ["He", "llo", "!"]
    assert written["token_logprobs"] == [None, -0.25, -9999.0]
    assert written["top_logprobs"] == [None, {"llo": -0.25}, {"?": -0.1, "!": -9999.0}]
    assert written["text_offset"] == [0, 2, 5]
    as_ids = completion_logprobs(entries[1:2], top=2, as_ids=True, offset=7)
    assert as_ids["tokens"] == ["token_id:2"] and as_ids["text_offset"] == [7]
    assert as_ids["top_logprobs"] == [{"token_id:2": -0.25, "token_id:9": -2.0}]


def test_chat_entries_carry_bytes_and_as_many_alternatives_as_asked() -> None:
    written = chat_entry(entry(5, "é", -0.1, (5, "é", -0.1), (6, "e", -3.0)), 1, False)
    assert written == {
        "token": "é",
        "logprob": -0.1,
        "bytes": [0xC3, 0xA9],
        "top_logprobs": [{"token": "é", "logprob": -0.1, "bytes": [0xC3, 0xA9]}],
    }


def test_echo_puts_the_prompt_and_its_logprobs_before_the_completion() -> None:
    asked = Asked(logprobs=0, prompt_logprobs=None, as_ids=False)
    echo = Echo("ab", [first_prompt_entry(97, "a"), entry(98, "b", -1.5)])
    choice = text_choice(asked, 0, result("c", -0.5), echo)
    assert choice["text"] == "abc"
    assert choice["logprobs"]["token_logprobs"] == [None, -1.5, -0.5]
    assert "prompt_logprobs" not in choice


def test_vllm_prompt_logprobs_rank_the_alternatives() -> None:
    entries = [None, entry(4, "x", -2.0, (8, "y", -0.1), (4, "x", -2.0))]
    written = vllm_prompt_logprobs(entries, top=1, as_ids=False)
    assert written is not None and written[0] is None
    assert written[1] == {
        "8": {"logprob": -0.1, "rank": 1, "decoded_token": "y"},
        "4": {"logprob": -2.0, "rank": None, "decoded_token": "x"},
    }


def test_streamed_choices_continue_offsets_and_name_the_role_once() -> None:
    text = StreamedText(Asked(0, None, False), 2)
    first = text.piece("ab", [entry(1, "a", -1.0), entry(2, "b", -1.0)], None)
    second = text.piece("c", [entry(3, "c", -1.0)], None)
    assert first["index"] == 2 and second["logprobs"]["text_offset"] == [2]
    message = StreamedMessage(Asked(None, None, False), 0)
    assert message.piece("hi", [], None)["delta"] == {"role": "assistant", "content": "hi"}
    assert message.piece("", [], "stop") == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
