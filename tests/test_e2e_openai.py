"""The OpenAI API's depth, end to end: the real ``routerd serve --demo`` process driven
by the ``openai`` SDK — sampling fields, ``n``/``best_of``, logprobs (whole and
streamed), echo for log-likelihood evaluation, and honest validation.

The demo models have random weights: the tests check each field's effect (greedy
equalities, token counts, shapes), not what the text says.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from tests import test_e2e
from tests.test_e2e import Daemon

# The same fixtures as test_e2e: a daemon of this module's own, and the SDK on it.
daemon = test_e2e.daemon
sdk = test_e2e.sdk

PROMPT = "def main(argv):\n    "
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def eos_id(demo_root: Path) -> int:
    return int(AutoTokenizer.from_pretrained(demo_root / "demo-small").eos_token_id)


def test_top_k_1_at_temperature_1_equals_greedy(sdk: openai.OpenAI) -> None:
    greedy = sdk.completions.create(model="demo-small", prompt=PROMPT, max_tokens=12, temperature=0)
    for seed in (1, 2, 3):
        top1 = sdk.completions.create(
            model="demo-small",
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.0,
            seed=seed,
            extra_body={"top_k": 1},
        )
        assert top1.choices[0].text == greedy.choices[0].text


def test_ignore_eos_gives_exactly_max_tokens(sdk: openai.OpenAI, eos_id: int) -> None:
    def forced_eos(**extra: object) -> tuple[int, str]:
        """Completion tokens and finish reason when the eos token is all but certain."""
        answer = sdk.completions.create(
            model="demo-small",
            prompt=PROMPT,
            max_tokens=9,
            temperature=0,
            logit_bias={str(eos_id): 100},
            extra_body=extra,
        )
        assert answer.usage is not None
        return answer.usage.completion_tokens, answer.choices[0].finish_reason

    assert forced_eos() == (1, "stop")
    assert forced_eos(ignore_eos=True) == (9, "length")
    assert forced_eos(min_tokens=4) == (5, "stop")  # 4 tokens, then the eos


def test_n_choices_with_a_seed_differ_and_repeat(sdk: openai.OpenAI) -> None:
    def ask() -> list[str]:
        answer = sdk.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=8, n=3, seed=7, temperature=1.0
        )
        assert [c.index for c in answer.choices] == [0, 1, 2]
        return [c.message.content or "" for c in answer.choices]

    first = ask()
    assert first == ask()
    assert len(set(first)) > 1, "each choice samples with its own seed"


def test_best_of_returns_the_most_likely_of_its_choices(sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(
        model="demo-small",
        prompt=PROMPT,
        max_tokens=6,
        n=2,
        best_of=4,
        seed=3,
        temperature=1.0,
        logprobs=0,
    )
    assert all(c.logprobs and c.logprobs.token_logprobs for c in answer.choices)
    sums = [sum(c.logprobs.token_logprobs) for c in answer.choices if c.logprobs]
    assert len(sums) == 2 and sums[0] >= sums[1]
    assert answer.usage is not None and answer.usage.completion_tokens >= 4  # all four ran


def test_chat_logprobs_whole_and_streamed(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = whole.choices[0].logprobs.content if whole.choices[0].logprobs else None
    assert content is not None and whole.usage is not None
    assert len(content) == whole.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen is the top
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob)
        assert [t.logprob for t in token.top_logprobs] == sorted(
            (t.logprob for t in token.top_logprobs), reverse=True
        )
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
    streamed = []
    for chunk in sdk.chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ]


def test_log_likelihood_with_echo_and_no_new_tokens(sdk: openai.OpenAI) -> None:
    answer = sdk.completions.create(
        model="demo-small", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    choice = answer.choices[0]
    assert choice.text == PROMPT
    assert answer.usage is not None and answer.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens or []) == answer.usage.prompt_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in logprobs.token_logprobs[1:])
    one = sdk.completions.create(
        model="demo-small", prompt=PROMPT, max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    extended = one.choices[0].logprobs
    assert extended is not None and extended.token_logprobs is not None
    assert extended.tokens == [*(logprobs.tokens or []), extended.tokens[-1]]
    assert extended.token_logprobs[0] is None
    assert extended.token_logprobs[1:-1] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-4)


def test_streamed_echo_sends_the_prompt_first(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.completions.create(
            model="demo-small", prompt=PROMPT, max_tokens=3, echo=True, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text == PROMPT
    whole = sdk.completions.create(
        model="demo-small", prompt=PROMPT, max_tokens=3, echo=True, temperature=0
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    scored = list(
        sdk.completions.create(
            model="demo-small",
            prompt=PROMPT,
            max_tokens=3,
            n=2,
            echo=True,
            logprobs=1,
            temperature=0,
            stream=True,
        )
    )
    firsts = {c.choices[0].index: c.choices[0] for c in reversed(scored) if c.choices}
    whole_scored = sdk.completions.create(
        model="demo-small", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1
    ).choices[0]
    assert whole_scored.logprobs is not None
    for index in (0, 1):  # each choice's first chunk: the prompt with its logprobs
        first = firsts[index]
        assert first.text == PROMPT and first.logprobs is not None
        assert first.logprobs.tokens == whole_scored.logprobs.tokens
        assert first.logprobs.token_logprobs[0] is None
        assert first.logprobs.token_logprobs[1:] == pytest.approx(
            whole_scored.logprobs.token_logprobs[1:], abs=1e-4
        )


def test_fields_outside_both_schemas_are_ignored_and_named(sdk: openai.OpenAI) -> None:
    raw = sdk.completions.with_raw_response.create(
        model="demo-small", prompt="x", max_tokens=1, extra_body={"frobnicate": 1}
    )
    assert raw.headers["x-routerd-ignored-fields"] == "frobnicate"
    assert raw.parse().choices


def test_known_fields_routerd_cannot_honour_are_refused_by_name(sdk: openai.OpenAI) -> None:
    for body, param in (
        ({"use_beam_search": True}, "use_beam_search"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=1, extra_body=body
            )
        assert caught.value.param == param


def test_an_endpoint_that_does_not_fit_the_model_is_refused_before_any_load(
    daemon: Daemon, sdk: openai.OpenAI
) -> None:
    daemon.routerctl("evict", "demo-embed")
    before = _embed_loads(daemon)
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="demo-embed", messages=MESSAGES, max_tokens=1)
    assert caught.value.param == "model"
    with pytest.raises(openai.BadRequestError):
        sdk.embeddings.create(model="demo-small", input="x")
    assert _embed_loads(daemon) == before


def _embed_loads(daemon: Daemon) -> float:
    """demo-embed's loads so far, as /metrics counts them."""
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("routerd_loads_total") and 'model="demo-embed"' in line
    )
