"""Every ``SamplingParams`` field through the transformers backend, each checked for its
effect: against a hand computation over a direct forward pass of demo-small where the
field changes what is chosen, against the same request without it where it cuts or ends.

demo-small's weights are random, so its distribution is nearly flat: a small bias or
penalty moves the greedy choice, and a sampler at temperature 1 roams the whole
vocabulary unless a field stops it — which is what lets each test fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from backends.base import GenerationRow, LoadedModel
from contract.errors import InvalidRequest
from contract.generation import Generation, GenerationResult, Logprob, SamplingParams

TEXTS = ("def main(argv):\n    ", "Hello", "import os", "class A:", "return None")
SEEDS = range(6)


# -- helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(small_model: LoadedModel) -> list[list[int]]:
    return [small_model.encode_prompt(text) for text in TEXTS]


@pytest.fixture(scope="module")
def module(small_model: LoadedModel) -> Any:
    return getattr(small_model, "_model")  # noqa: B009 — the wrapped HF module


@pytest.fixture(scope="module")
def eos(small_model: LoadedModel) -> int:
    eos_ids: frozenset[int] = getattr(small_model, "_eos_ids")  # noqa: B009
    tokenizer: Any = getattr(small_model, "_tokenizer")  # noqa: B009
    assert tokenizer.eos_token_id in eos_ids
    return int(tokenizer.eos_token_id)


def params(max_tokens: int, **fields: Any) -> SamplingParams:
    """Greedy unless ``temperature`` is given."""
    fields.setdefault("temperature", 0.0)
    return SamplingParams(max_tokens=max_tokens, **fields)


def generate(model: LoadedModel, prompt: Sequence[int], p: SamplingParams) -> GenerationResult:
    return model.generate(Generation(list(prompt), p))


def ids_of(result: GenerationResult) -> list[int]:
    """The generated token ids (the row must have asked for logprobs)."""
    assert result.logprobs is not None
    assert len(result.logprobs) == result.completion_tokens
    return [entry.token_id for entry in result.logprobs]


def tokens(model: LoadedModel, prompt: Sequence[int], p: SamplingParams) -> list[int]:
    if p.logprobs is None:
        p.logprobs = 0
    return ids_of(generate(model, prompt, p))


def last_logits(module: Any, ids: Sequence[int]) -> torch.Tensor:
    """The next-token logits after ``ids``, by a plain forward pass (no cache)."""
    with torch.inference_mode():
        return module(input_ids=torch.tensor([list(ids)])).logits[0, -1].float()


def penalized(
    logits: torch.Tensor,
    prompt: Sequence[int],
    output: Sequence[int],
    bias: dict[int, float],
    repetition: float = 1.0,
    frequency: float = 0.0,
    presence: float = 0.0,
    prompt_repeats: bool = True,
) -> torch.Tensor:
    """vLLM's bias and penalties, written out token by token (``prompt_repeats`` False:
    a wrong repetition penalty that forgets the prompt, for the test to tell apart)."""
    x = logits.clone()
    for token, value in bias.items():
        x[token] += value
    for token in (set(prompt) if prompt_repeats else set()) | set(output):
        if repetition != 1.0:
            x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    for token in set(output):
        x[token] -= frequency * output.count(token) + presence
    return x


# -- cuts: top_k, top_p, min_p -------------------------------------------------------


def test_top_k_one_at_temperature_one_is_greedy(small_model: LoadedModel, prompts: list[list[int]]):
    for prompt in prompts[:3]:
        expected = tokens(small_model, prompt, params(10))
        for seed in SEEDS:
            p = params(10, temperature=1.0, top_k=1, seed=seed)
            assert tokens(small_model, prompt, p) == expected
    unlimited = [
        tokens(small_model, prompts[0], params(10, temperature=1.0, seed=s)) for s in SEEDS
    ]
    assert any(run != tokens(small_model, prompts[0], params(10)) for run in unlimited)


def _support_top_k(probs: torch.Tensor) -> set[int]:
    return set(torch.topk(probs, 7).indices.tolist())


def _support_top_p(probs: torch.Tensor) -> set[int]:
    ordered, order = torch.sort(probs, descending=True)
    before = torch.cumsum(ordered, 0) - ordered
    return {int(order[i]) for i in range(len(order)) if i == 0 or before[i] < 0.02}


def _support_min_p(probs: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(probs.tolist()) if v >= 0.97 * float(probs.max())}


def _support_min_p_then_top_p(probs: torch.Tensor) -> set[int]:
    """vLLM's order: min_p cuts first, top_p counts the mass of what is left."""
    kept = sorted(((v, i) for i, v in enumerate(probs.tolist()) if v >= 0.9 * float(probs.max())))
    total = sum(v for v, _ in kept)
    support, before = set(), 0.0
    for v, i in reversed(kept):
        if support and before >= 0.3 * total:
            break
        support.add(i)
        before += v
    return support


@pytest.mark.parametrize(
    ("cut", "support"),
    [
        ({"top_k": 7}, _support_top_k),
        ({"top_p": 0.02}, _support_top_p),
        ({"top_p": 0.02, "top_k": 1000}, _support_top_p),  # the shaped path's top_p
        ({"min_p": 0.97}, _support_min_p),
        ({"min_p": 0.9, "top_p": 0.3}, _support_min_p_then_top_p),
    ],
    ids=["top_k", "top_p", "top_p-shaped", "min_p", "min_p-then-top_p"],
)
def test_cuts_keep_every_sampled_token_inside_their_support(
    small_model: LoadedModel,
    module: Any,
    prompts: list[list[int]],
    cut: dict[str, float],
    support: Callable[[torch.Tensor], set[int]],
):
    """At each step the support is computed by hand from a direct forward pass over the
    prompt and the tokens sampled so far; without the cut, samples leave it."""
    prompt, temperature = prompts[1], 1.5
    strays = 0
    for seed in SEEDS:
        cut_run = tokens(small_model, prompt, params(5, temperature=temperature, seed=seed, **cut))
        free_run = tokens(small_model, prompt, params(5, temperature=temperature, seed=seed))
        for run, inside in ((cut_run, True), (free_run, False)):
            for step, token in enumerate(run):
                probs = torch.softmax(last_logits(module, prompt + run[:step]) / temperature, 0)
                allowed = support(probs)
                assert 1 <= len(allowed) < 60
                if inside:
                    assert token in allowed
                else:
                    strays += token not in allowed
    assert strays > 0


# -- what may be chosen: logit_bias, allowed_token_ids ------------------------------------


def test_logit_bias_forces_a_token(small_model: LoadedModel, prompts: list[list[int]]):
    forced = small_model.encode_prompt(" while")[-1]
    plain = tokens(small_model, prompts[0], params(6))
    assert any(token != forced for token in plain)
    assert tokens(small_model, prompts[0], params(6, logit_bias={forced: 100.0})) == [forced] * 6
    sampled = params(6, temperature=1.0, seed=3, logit_bias={forced: 100.0})
    assert tokens(small_model, prompts[0], sampled) == [forced] * 6


def test_logit_bias_moves_the_greedy_choice_as_computed(
    small_model: LoadedModel, module: Any, prompts: list[list[int]]
):
    prompt = prompts[2]
    logits = last_logits(module, prompt)
    runner_up = int(torch.topk(logits, 2).indices[1])
    gap = float(logits.max() - logits[runner_up])
    bias = {runner_up: gap + 1e-3}
    assert tokens(small_model, prompt, params(1, logit_bias=bias))[0] == runner_up
    assert (
        tokens(small_model, prompt, params(1, logit_bias={runner_up: gap - 1e-3}))[0] != runner_up
    )


def test_allowed_token_ids_restrict_every_token(
    small_model: LoadedModel, module: Any, prompts: list[list[int]]
):
    allowed = [40, 41, 300, 600, 901]
    prompt = prompts[0]
    for seed in SEEDS:
        p = params(8, temperature=1.0, seed=seed, allowed_token_ids=allowed)
        assert set(tokens(small_model, prompt, p)) <= set(allowed)
    greedy = tokens(small_model, prompt, params(8, allowed_token_ids=allowed))
    sequence = list(prompt)
    for token in greedy:  # greedy among the allowed: the argmax of their raw logits
        logits = last_logits(module, sequence)
        assert token == allowed[int(torch.argmax(logits[allowed]))]
        sequence.append(token)
    assert not set(tokens(small_model, prompt, params(8))) <= set(allowed)


def test_token_ids_outside_the_vocabulary_fail_their_row(small_model: LoadedModel):
    vocab = small_model.info.vocab_size
    with pytest.raises(InvalidRequest):
        generate(small_model, [5, 6], params(2, allowed_token_ids=[1, vocab]))
    with pytest.raises(InvalidRequest):
        generate(small_model, [5, 6], params(2, logit_bias={vocab + 3: 1.0}))


# -- penalties ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("penalty", "wrong"),
    [
        ({"repetition": 1.5}, {"repetition": 1.5, "prompt_repeats": False}),
        ({"frequency": 0.07}, {"presence": 0.07}),
        ({"presence": 0.07}, {"frequency": 0.07}),
    ],
    ids=["repetition", "frequency", "presence"],
)
def test_penalties_change_the_greedy_choice_as_computed(
    small_model: LoadedModel,
    module: Any,
    prompts: list[list[int]],
    penalty: dict[str, float],
    wrong: dict[str, Any],
):
    """Greedy decoding under a penalty takes, at each step, the argmax of the direct
    forward pass's logits with vLLM's formula applied by hand.

    A bias lifts two prompt tokens just above the rest (one by 0.1, one by 0.05), so
    that the penalty decides whether they come (repetition: they are in the prompt),
    and how often (frequency: less each time; presence: a fixed amount) — where a
    wrong formula (``wrong``) chooses otherwise."""
    prompt = prompts[0]
    first, second = prompt[-1], prompt[-2]
    logits = last_logits(module, prompt)
    rest = logits.clone()
    rest[[first, second]] = float("-inf")
    others = float(rest.max())
    bias = {
        first: others - float(logits[first]) + 0.1,
        second: others - float(logits[second]) + 0.05,
    }
    names = {"repetition": "repetition_penalty", "frequency": "frequency_penalty"}
    fields = {names.get(k, "presence_penalty"): v for k, v in penalty.items()}
    got = tokens(small_model, prompt, params(12, logit_bias=bias, **fields))

    def by_hand(formula: dict[str, Any]) -> list[int]:
        output: list[int] = []
        for _ in got:
            x = penalized(last_logits(module, prompt + output), prompt, output, bias, **formula)
            output.append(int(torch.argmax(x)))
        return output

    assert got == by_hand(penalty)
    assert got != by_hand(wrong)
    assert got != tokens(small_model, prompt, params(12, logit_bias=bias))


def test_repetition_penalty_multiplies_negative_logits(
    small_model: LoadedModel, module: Any, prompts: list[list[int]]
):
    """Between a prompt token with a negative logit and an unseen token a little below
    it, the penalty (×1.5 on the negative logit) turns the choice to the unseen one."""
    prompt = prompts[0]
    logits = last_logits(module, prompt)
    seen = max((t for t in set(prompt) if logits[t] < 0), key=lambda t: float(logits[t]))
    low, high = 1.5 * float(logits[seen]), float(logits[seen])
    unseen = next(
        t for t in range(len(logits)) if t not in prompt and low < float(logits[t]) < high
    )
    allowed = [seen, unseen]
    assert tokens(small_model, prompt, params(1, allowed_token_ids=allowed)) == [seen]
    penalized_run = params(1, allowed_token_ids=allowed, repetition_penalty=1.5)
    assert tokens(small_model, prompt, penalized_run) == [unseen]


# -- how rows end: ignore_eos, min_tokens, stop_token_ids, stop strings ----------------------


def test_ignore_eos_runs_to_max_tokens(
    small_model: LoadedModel, prompts: list[list[int]], eos: int
):
    bias = {eos: 100.0}
    ended = generate(small_model, prompts[0], params(7, logit_bias=bias, logprobs=0))
    assert (ended.completion_tokens, ended.finish_reason, ended.text) == (1, "stop", "")
    assert ids_of(ended) == [eos]
    ignored = generate(
        small_model, prompts[0], params(7, logit_bias=bias, ignore_eos=True, logprobs=0)
    )
    assert (ignored.completion_tokens, ignored.finish_reason, ignored.text) == (7, "length", "")
    assert ids_of(ignored) == [eos] * 7
    assert ignored.logprobs is not None
    assert {entry.token for entry in ignored.logprobs} == {"</s>"}  # special tokens by name


def test_min_tokens_hold_back_eos_and_stop_ids(
    small_model: LoadedModel, prompts: list[list[int]], eos: int
):
    bias = {eos: 100.0}
    result = generate(
        small_model, prompts[0], params(20, logit_bias=bias, min_tokens=4, logprobs=0)
    )
    assert result.completion_tokens == 5 and result.finish_reason == "stop"
    produced = ids_of(result)
    assert eos not in produced[:4] and produced[4] == eos
    assert result.text and result.text == generate(small_model, prompts[0], params(4)).text
    stop_id = small_model.encode_prompt(" while")[-1]
    p = params(20, logit_bias={stop_id: 100.0}, stop_token_ids=[stop_id], min_tokens=3, logprobs=0)
    held = generate(small_model, prompts[0], p)
    assert ids_of(held)[3:] == [stop_id] and stop_id not in ids_of(held)[:3]
    assert held.finish_reason == "stop"


def test_stop_token_ids_end_the_row(small_model: LoadedModel, prompts: list[list[int]]):
    prompt = prompts[0]
    free = tokens(small_model, prompt, params(16))
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    result = generate(small_model, prompt, params(16, stop_token_ids=[free[k]], logprobs=0))
    assert result.finish_reason == "stop"
    assert result.completion_tokens == k + 1  # the stop id counts; its text is not added
    assert ids_of(result) == free[: k + 1]
    assert result.text == generate(small_model, prompt, params(k)).text


def _longest(model: LoadedModel, prompts: list[list[int]]) -> tuple[list[int], str]:
    runs = [(prompt, generate(model, prompt, params(24)).text) for prompt in prompts]
    return max(runs, key=lambda pair: len(pair[1]))


def test_include_stop_str_in_output(small_model: LoadedModel, prompts: list[list[int]]):
    prompt, text = _longest(small_model, prompts)
    stop = text[6:9]
    pieces: list[str] = []
    p = params(24, stop=[stop], include_stop_str_in_output=True)
    result = small_model.generate(Generation(prompt, p, pieces.append))
    assert result.finish_reason == "stop"
    assert result.text == text[: text.index(stop) + len(stop)]
    assert "".join(pieces) == result.text
    cut = generate(small_model, prompt, params(24, stop=[stop]))
    assert cut.text == text[: text.index(stop)]


def test_no_stop_string_ends_a_row_before_min_tokens(
    small_model: LoadedModel, prompts: list[list[int]]
):
    prompt, text = _longest(small_model, prompts)
    stop = text[1:3]
    assert generate(small_model, prompt, params(24, stop=[stop])).completion_tokens < 8
    pieces: list[str] = []
    held = small_model.generate(
        Generation(prompt, params(24, stop=[stop], min_tokens=8), pieces.append)
    )
    assert held.completion_tokens >= 8
    assert held.text.startswith(text[:3]) and "".join(pieces) == held.text


# -- seeds ---------------------------------------------------------------------------------


def test_seed_gives_the_same_output_twice(small_model: LoadedModel, prompts: list[list[int]]):
    def run(seed: int) -> list[int]:
        p = params(10, temperature=1.0, top_k=50, presence_penalty=0.1, seed=seed)
        return tokens(small_model, prompts[0], p)

    assert [run(s) for s in SEEDS] == [run(s) for s in SEEDS]
    assert len({tuple(run(s)) for s in SEEDS}) > 1


# -- logprobs --------------------------------------------------------------------------------


def _check_entry(entry: Logprob, raw: torch.Tensor, top: int, text: Callable[[int], str]) -> None:
    """``entry`` against the log-softmax of a direct forward pass."""
    assert entry.token == text(entry.token_id)
    assert torch.allclose(torch.tensor(entry.logprob), raw[entry.token_id], atol=1e-4)
    assert len(entry.top) == top
    values = torch.tensor([alt.logprob for alt in entry.top])
    assert torch.equal(values, torch.sort(values, descending=True).values)
    expected = torch.topk(raw, top)
    assert torch.allclose(values, expected.values, atol=1e-4)
    assert [alt.token_id for alt in entry.top] == expected.indices.tolist()
    assert all(alt.token == text(alt.token_id) and not alt.top for alt in entry.top)


@pytest.fixture(scope="module")
def token_text(small_model: LoadedModel) -> Callable[[int], str]:
    tokenizer: Any = getattr(small_model, "_tokenizer")  # noqa: B009
    return lambda i: str(tokenizer.decode([i], skip_special_tokens=False))


def test_logprobs_equal_a_direct_forward_pass(
    small_model: LoadedModel, module: Any, prompts: list[list[int]], token_text: Any
):
    for prompt in prompts[:3]:
        result = generate(small_model, prompt, params(8, logprobs=5))
        assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
        sequence = list(prompt)
        for entry in result.logprobs:
            raw = torch.log_softmax(last_logits(module, sequence), dim=-1)
            _check_entry(entry, raw, 5, token_text)
            assert entry.token_id == entry.top[0].token_id  # greedy, nothing shaped
            sequence.append(entry.token_id)
    bare = generate(small_model, prompts[0], params(3, logprobs=0))
    assert bare.logprobs is not None and all(not entry.top for entry in bare.logprobs)
    assert generate(small_model, prompts[0], params(3)).logprobs is None


def test_logprobs_are_raw_whatever_shapes_the_sampling(
    small_model: LoadedModel, module: Any, prompts: list[list[int]], token_text: Any
):
    p = params(8, temperature=0.3, seed=5, repetition_penalty=1.5, presence_penalty=0.4, logprobs=3)
    result = generate(small_model, prompts[1], p)
    assert result.logprobs is not None
    sequence = list(prompts[1])
    for entry in result.logprobs:
        _check_entry(entry, torch.log_softmax(last_logits(module, sequence), -1), 3, token_text)
        sequence.append(entry.token_id)
    assert any(entry.token_id != entry.top[0].token_id for entry in result.logprobs)


def test_prompt_logprobs_equal_a_direct_forward_pass(
    small_model: LoadedModel, module: Any, prompts: list[list[int]], token_text: Any
):
    """A prompt of 600 tokens: three chunks, each continuing the last one's cache."""
    prompt = (prompts[0] + prompts[3] + prompts[4]) * 30
    prompt = prompt[:600]
    result = generate(small_model, prompt, params(2, prompt_logprobs=4))
    entries = result.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    with torch.inference_mode():
        raw = torch.log_softmax(module(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    for position, entry in enumerate(entries[1:], start=1):
        assert entry is not None and entry.token_id == prompt[position]
        _check_entry(entry, raw[position - 1], 4, token_text)
    assert result.completion_tokens == 2 and result.logprobs is None


def test_max_tokens_zero_gives_the_prompt_logprobs_alone(
    small_model: LoadedModel, prompts: list[list[int]]
):
    result = generate(small_model, prompts[0], params(0, prompt_logprobs=0))
    assert (result.text, result.completion_tokens, result.finish_reason) == ("", 0, "length")
    entries = result.prompt_logprobs
    assert entries is not None and len(entries) == len(prompts[0]) and entries[0] is None
    assert all(entry is not None and not entry.top for entry in entries[1:])


def test_streamed_logprobs_come_before_their_text(
    small_model: LoadedModel, prompts: list[list[int]]
):
    decode: Callable[[Sequence[int]], str] = getattr(small_model, "_decode")  # noqa: B009
    prompt, _ = _longest(small_model, prompts)
    events: list[Logprob | str] = []
    result = small_model.generate(
        Generation(prompt, params(24, logprobs=2), events.append, on_logprob=events.append)
    )
    streamed = [e for e in events if isinstance(e, Logprob)]
    assert streamed == result.logprobs and len(streamed) == result.completion_tokens
    announced: list[int] = []
    text = ""
    for event in events:
        if isinstance(event, Logprob):
            announced.append(event.token_id)
            continue
        text += event
        assert decode(announced).startswith(text)  # only announced tokens made it
    assert text == result.text and isinstance(events[0], Logprob)


# -- a mixed batch -------------------------------------------------------------------------


def test_a_mixed_batch_gives_each_row_its_output_alone(
    small_model: LoadedModel, prompts: list[list[int]]
):
    shaped = params(10, repetition_penalty=1.6, presence_penalty=0.2, logprobs=3)
    sampled = params(10, temperature=1.0, top_k=20, min_p=0.5, seed=9, logprobs=1)
    plain = params(10)
    rows: list[GenerationRow] = [
        GenerationRow(list(prompt), p, on_done=lambda row: None)
        for prompt, p in ((prompts[0], shaped), (prompts[1], plain), (prompts[2], sampled))
    ]
    alone = [generate(small_model, row.prompt_ids, row.params) for row in rows]
    small_model.generate_batch(rows, None)
    together = [row.outcome() for row in rows]
    assert together[1] == alone[1]
    for mine, solo in ((together[0], alone[0]), (together[2], alone[2])):
        assert (mine.text, mine.completion_tokens, mine.finish_reason) == (
            solo.text,
            solo.completion_tokens,
            solo.finish_reason,
        )
        assert ids_of(mine) == ids_of(solo)
        assert mine.logprobs is not None and solo.logprobs is not None
        for a, b in zip(mine.logprobs, solo.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t.token_id for t in a.top] == [t.token_id for t in b.top]
    assert ids_of(together[0]) != tokens(small_model, prompts[0], params(10))


def test_transformers_refuses_no_field(small_model: LoadedModel) -> None:
    assert small_model.info.refuses == frozenset()
