"""Property tests: any body a client may send gets a typed request or a clear 400 — never
a crash, never a 5xx, and the daemon keeps serving.

Two levels: the parsers (``routerd.api.schemas``) called directly with generated JSON
values, and the real app (middlewares, handlers, scheduler, a fake backend) served on
a socket and sent generated bodies over HTTP. Examples are few and unhurried
(``deadline=None``) so the suite stays quick on a shared CI machine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routerd.api.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from routerd.errors import BadRequest
from tests.support import ServedApp

pytestmark = pytest.mark.slow  # property-based runs of many examples each

# -- generated JSON ---------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)  # json.loads accepts NaN, Infinity
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

FIELDS = [
    "model", "prompt", "messages", "input", "max_tokens", "max_completion_tokens",
    "temperature", "top_p", "seed", "stop", "stream", "stream_options", "n", "user",
    "keep_alive", "logprobs", "echo", "encoding_format", "dimensions", "tools",
    "response_format", "best_of", "suffix", "logit_bias",
]  # fmt: skip

# Plausible values reach deeper into the parsers than random ones alone.
plausible: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["a", "embedder", "a@1", "missing", " ", ""]),
    "prompt": st.one_of(
        st.text(max_size=30),
        st.lists(st.integers(-3, 300), max_size=5),
        st.lists(st.text(max_size=5), max_size=3),
        st.lists(st.lists(st.integers(0, 255), max_size=3), max_size=3),
    ),
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "robot"])},
            optional={"content": st.one_of(st.text(max_size=10), json_values)},
        ),
        max_size=3,
    ),
    "input": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3)),
    "max_tokens": st.one_of(st.integers(-2, 100), json_values),
    "temperature": st.one_of(st.floats(-1, 3), st.just(math.nan), json_values),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.just(math.inf), json_values),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=6)),
    "stream": st.one_of(st.booleans(), json_values),
    "keep_alive": st.one_of(
        st.sampled_from(["5m", "0", -1, 0, "-2s", "1h", "soon"]),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
}


def _value_for(field: str) -> st.SearchStrategy[Any]:
    return st.one_of(plausible[field], json_values) if field in plausible else json_values


# A valid-looking base, then a few fields set to plausible or arbitrary values: each
# body is wrong in few places, so the checks behind the first one are reached too.
bodies = st.fixed_dictionaries(
    {k: v for k, v in plausible.items() if k in ("model", "prompt", "messages", "input")}
).flatmap(
    lambda base: (
        st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)
        .flatmap(lambda keys: st.fixed_dictionaries({k: _value_for(k) for k in keys}))
        .map(lambda extra: {**base, **extra})
    )
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_sampling(req: CompletionRequest | ChatRequest) -> None:
    s = req.sampling
    assert math.isfinite(s.temperature) and 0 <= s.temperature <= 2
    assert math.isfinite(s.top_p) and 0 < s.top_p <= 1
    assert s.max_tokens is None or (isinstance(s.max_tokens, int) and s.max_tokens >= 1)
    assert len(s.stop) <= 4 and all(isinstance(x, str) and x for x in s.stop)
    assert isinstance(req.stream, bool) and isinstance(req.include_usage, bool)


def _check_common(req: CompletionRequest | ChatRequest | EmbeddingRequest) -> None:
    assert isinstance(req.model, str) and req.model.strip() == req.model and req.model
    assert req.keep_alive is None or (req.keep_alive >= 0 and not math.isnan(req.keep_alive))


def _check_prompts(prompts: list[Any]) -> None:
    assert prompts
    for p in prompts:
        assert isinstance(p, str) or (
            p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p)
        )


def _refused_cleanly(exc: BadRequest) -> None:
    assert exc.status == 400 and exc.message
    assert exc.param is None or isinstance(exc.param, str)


# -- the parsers --------------------------------------------------------------------


@FUZZ
@given(bodies)
def test_completion_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_completion(body)
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_sampling(req)
    _check_prompts(req.prompts)


@FUZZ
@given(bodies)
def test_chat_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_chat(body)
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_sampling(req)
    assert req.messages and all(
        set(m) == {"role", "content"} and isinstance(m["content"], str) for m in req.messages
    )


@FUZZ
@given(bodies)
def test_embedding_parser_returns_a_valid_request_or_a_400(body):
    try:
        req = parse_embedding(body)
    except BadRequest as exc:
        _refused_cleanly(exc)
        return
    _check_common(req)
    _check_prompts(req.inputs)
    assert req.encoding_format in ("float", "base64")


@FUZZ
@given(
    field=st.sampled_from(["temperature", "top_p", "keep_alive", "max_tokens", "seed"]),
    value=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**80), 2**80),
)
def test_numbers_out_of_every_range_are_refused(field, value):
    """NaN and infinities pass naive range checks (every comparison with NaN is false)."""
    completion = {"model": "a", "prompt": "x"}
    chat = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    for parse, body in ((parse_completion, completion), (parse_chat, chat)):
        try:
            req = parse({**body, field: value})
        except BadRequest as exc:
            assert exc.param == field
            continue
        _check_common(req)
        _check_sampling(req)
        assert req.sampling.params.seed is None or -(2**63) <= req.sampling.params.seed < 2**64


# -- the real app over HTTP -----------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    with ServedApp(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/v1/embeddings"]


def _assert_answered_well(status: int, payload: bytes) -> None:
    assert status < 500, payload[:500]
    if status >= 400:
        error = json.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]


@FUZZ
@given(endpoint=st.sampled_from(ENDPOINTS), body=bodies)
def test_the_app_answers_generated_json_without_5xx(served, endpoint, body):
    raw = json.dumps(body, allow_nan=True).encode()
    status, payload = served.post(endpoint, raw)
    _assert_answered_well(status, payload)


@settings(max_examples=60, deadline=None)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    raw=st.one_of(
        st.binary(max_size=200),
        st.integers(1, 50_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 50_000).map(lambda depth: b'{"model": ' + b"[" * depth),
    ),
)
def test_the_app_answers_raw_bytes_without_5xx(served, endpoint, raw):
    status, payload = served.post(endpoint, raw)
    _assert_answered_well(status, payload)


def test_the_app_still_serves_after_the_fuzzing(served):
    status, payload = served.post(
        "/v1/completions", json.dumps({"model": "a", "prompt": "ok", "max_tokens": 2}).encode()
    )
    assert status == 200, payload
    assert json.loads(payload)["choices"][0]["text"] == "ko"
