"""The ``echo`` backend: alone, and behind the real app through the built-in registry."""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from backends.base import GenerationRow, LoadSpec
from backends.echo import EchoBackend, EchoModel
from backends.registry import BUILTIN_BACKENDS, BackendRegistry
from contract.errors import BackendError, InvalidRequest
from contract.generation import Cancellation, Generation, SamplingParams, Task
from routerd.app import build_app
from state import VersionSpec
from tests.fakes import FakeBackend
from tests.support import fake_services


def load(tmp_path: Path, **options: Any) -> EchoModel:
    backend = EchoBackend()
    spec = LoadSpec("echo", "1", str(tmp_path), backend.validate_options(options), "cpu")
    return backend.load(spec)


def params(max_tokens: int, *stop: str) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, stop=stop)


class Probe:
    """A generation row that records what it streamed and how often it finished."""

    def __init__(self, prompt: str, max_tokens: int, *stop: str) -> None:
        self.pieces: list[str] = []
        self.done = 0
        self.row = GenerationRow(
            list(prompt.encode()),
            params(max_tokens, *stop),
            self.pieces.append,
            on_done=self._on_done,
        )

    def _on_done(self, row: GenerationRow) -> None:
        self.done += 1


# -- options and footprint -----------------------------------------------------------


def test_registered_as_a_builtin_kind() -> None:
    assert "echo" in BUILTIN_BACKENDS
    assert BackendRegistry().get("echo").kind == "echo"


def test_options_are_validated_and_defaulted() -> None:
    backend = EchoBackend()
    defaults = backend.validate_options({})
    assert defaults == {
        "task": "generate",
        "context": 4096,
        "latency_ms": 0.0,
        "fail_rate": 0.0,
        "seed": 0,
        "bytes": 1024 * 1024,
        "inline": True,
    }
    assert backend.validate_options(defaults) == defaults  # normalized options stay valid
    assert backend.validate_options({"latency_ms": 2, "task": "embed"})["latency_ms"] == 2.0


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("latency_ms", -1),
        ("latency_ms", "5"),
        ("latency_ms", math.inf),
        ("fail_rate", 1.5),
        ("fail_rate", -0.1),
        ("task", "classify"),
        ("context", 0),
        ("context", True),
        ("seed", 1.5),
        ("bytes", -1),
        ("inline", "yes"),
        ("dtype", "float32"),  # unknown key
    ],
)
def test_bad_options_name_the_key(key: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        EchoBackend().validate_options({key: value})
    assert caught.value.param == key
    assert key in str(caught.value)


def test_inline_unless_asked_not_to_or_given_latency(tmp_path: Path) -> None:
    assert load(tmp_path).info.inline
    assert not load(tmp_path, inline=False).info.inline
    assert not load(tmp_path, latency_ms=1).info.inline, "sleeping blocks the loop"


def test_footprint_is_the_bytes_option_and_needs_a_folder(tmp_path: Path) -> None:
    backend = EchoBackend()
    spec = LoadSpec("echo", "1", str(tmp_path), {"bytes": 4096}, "cpu")
    assert backend.estimate_footprint(spec).total == 4096
    model = backend.load(spec)
    model.warm_up()
    assert model.measure_footprint().total == 4096
    missing = LoadSpec("echo", "1", str(tmp_path / "nope"), {}, "cpu")
    with pytest.raises(BackendError, match="not a directory"):
        backend.estimate_footprint(missing)
    with pytest.raises(BackendError):
        backend.load(missing)


def test_info_and_tokenizer(tmp_path: Path) -> None:
    model = load(tmp_path, context=128)
    assert model.info.task is Task.GENERATE
    assert model.info.context_length == 128
    assert model.info.vocab_size == 256
    assert model.encode_prompt("hé") == [104, 0xC3, 0xA9]
    assert model.count_tokens("hé") == 3
    chat = model.encode_chat(
        [{"role": "system", "content": "be"}, {"role": "user", "content": "x"}]
    )
    assert bytes(chat).decode() == "system: be\nuser: x\n"


# -- generation -----------------------------------------------------------------------


def test_generate_echoes_the_prompt_up_to_max_tokens(tmp_path: Path) -> None:
    model = load(tmp_path)
    result = model.generate(Generation(model.encode_prompt("abc"), params(7)))
    assert (result.text, result.finish_reason) == ("abcabca", "length")
    assert (result.prompt_tokens, result.completion_tokens) == (3, 7)
    short = model.generate(Generation(model.encode_prompt("abcdef"), params(2)))
    assert short.text == "ab"
    empty = model.generate(Generation([], params(5)))
    assert (empty.text, empty.finish_reason, empty.completion_tokens) == ("", "stop", 0)


def test_multibyte_characters_are_echoed_whole(tmp_path: Path) -> None:
    model = load(tmp_path)
    prompt = model.encode_prompt("hé€")
    pieces: list[str] = []
    result = model.generate(Generation(prompt, params(8), pieces.append, Cancellation()))
    assert (result.text, result.completion_tokens) == ("hé€h\ufffd", 8)  # cut mid-character
    assert pieces == ["h", "é", "€", "h", "\ufffd"]


# Settings a lone row without stop strings works out in one go (``_echo_alone``).
ONE_GO_SETTINGS: list[dict[str, Any]] = [
    {},
    {"stop_token_ids": [ord("c")]},
    {"stop_token_ids": [0xA9, ord("b")]},  # the second byte of "é", and "b"
    {"stop_token_ids": [0xE2]},  # the first byte of "€"
    {"stop_token_ids": [ord("a")], "min_tokens": 4},
    {"stop_token_ids": [ord("c"), 0x82], "min_tokens": 2, "include_stop_str_in_output": True},
    {"min_tokens": 1, "ignore_eos": True, "temperature": 0.5, "top_k": 3, "seed": 1},
]


@pytest.mark.parametrize("prompt", ["abc", "hé€", "€", "", "a\u00ff", "bcab"])
@pytest.mark.parametrize("max_tokens", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("settings", ONE_GO_SETTINGS, ids=str)
def test_a_lone_row_in_one_go_matches_stepping(
    tmp_path: Path, prompt: str, max_tokens: int, settings: dict[str, Any]
) -> None:
    model = load(tmp_path)
    ids = model.encode_prompt(prompt)
    sampling = SamplingParams(max_tokens=max_tokens, **settings)
    row = GenerationRow(list(ids), sampling, on_done=lambda _: None)
    model.generate_batch([row], lambda free: [])  # may admit: steps token by token
    try:
        alone = model.generate(Generation(ids, sampling))  # the one-go path
    except InvalidRequest as refused:
        assert isinstance(row.error, InvalidRequest) and row.error.param == refused.param
        return
    assert alone == row.result


def test_generate_streams_one_piece_per_token(tmp_path: Path) -> None:
    model = load(tmp_path)
    pieces: list[str] = []
    result = model.generate(
        Generation(model.encode_prompt("hey"), params(5), pieces.append, Cancellation())
    )
    assert pieces == ["h", "e", "y", "h", "e"]
    assert "".join(pieces) == result.text


def test_stop_strings_end_the_text_and_are_never_streamed(tmp_path: Path) -> None:
    model = load(tmp_path)
    pieces: list[str] = []
    prompt = model.encode_prompt("hello world")
    result = model.generate(
        Generation(prompt, params(50, "o w", "zz"), pieces.append, Cancellation())
    )
    assert (result.text, result.finish_reason) == ("hell", "stop")
    assert result.completion_tokens == 7  # up to the token that completed "o w"
    assert "".join(pieces) == "hell"
    # a held-back start of a stop string that never completes is sent at the end
    pieces.clear()
    result = model.generate(
        Generation(model.encode_prompt("abc"), params(3, "cx"), pieces.append, Cancellation())
    )
    assert (result.text, result.finish_reason) == ("abc", "length")
    assert "".join(pieces) == "abc"


def test_cancellation_stops_between_tokens(tmp_path: Path) -> None:
    model = load(tmp_path)
    cancellation = Cancellation()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancellation.cancel()

    result = model.generate(
        Generation(model.encode_prompt("abcdef"), params(100), on_text, cancellation)
    )
    assert (result.text, result.finish_reason, result.completion_tokens) == ("abc", "cancelled", 3)
    early = Cancellation()
    early.cancel()
    result = model.generate(Generation(model.encode_prompt("abc"), params(10), None, early))
    assert (result.text, result.finish_reason) == ("", "cancelled")


def test_generate_batch_admits_rows_between_steps(tmp_path: Path) -> None:
    model = load(tmp_path)
    first = [Probe("aaaa", 4), Probe("ab", 6, "ba")]
    late = [Probe("xyz", 2), Probe("q", 3)]
    offers: list[int] = []

    def admit(free: int) -> list[GenerationRow]:
        offers.append(free)
        if len(offers) == 2:
            return [p.row for p in late[:1]]
        if len(offers) == 3:
            return [p.row for p in late[1:]]
        return []

    model.generate_batch([p.row for p in first], admit, max_rows=3)
    everyone = first + late
    assert [p.done for p in everyone] == [1, 1, 1, 1]
    assert all(p.row.error is None and p.row.result is not None for p in everyone)
    texts = [p.row.result.text for p in everyone if p.row.result is not None]
    assert texts == ["aaaa", "a", "xy", "qqq"]
    assert [p.row.result.finish_reason for p in everyone if p.row.result] == [
        "length",
        "stop",
        "length",
        "length",
    ]
    assert all("".join(p.pieces) == p.row.result.text for p in everyone if p.row.result)
    assert offers[0] == 1 and offers[1] == 1 and offers[2] <= 2  # max_rows bounds the offer


def test_a_bad_row_fails_alone(tmp_path: Path) -> None:
    model = load(tmp_path)
    good = Probe("ok", 3)
    bad = Probe("x", 3)
    bad.row.prompt_ids = [1, 999]

    def broken(piece: str) -> None:
        raise RuntimeError("client went away badly")

    sink = Probe("zz", 3)
    sink.row.on_text = broken
    model.generate_batch([bad.row, good.row, sink.row], None)
    assert [p.done for p in (bad, good, sink)] == [1, 1, 1]
    assert isinstance(bad.row.error, InvalidRequest) and bad.row.result is None
    assert isinstance(sink.row.error, RuntimeError) and sink.row.result is None
    assert good.row.result is not None and good.row.result.text == "oko"


def test_it_refuses_what_needs_a_distribution_and_nothing_else(tmp_path: Path) -> None:
    refused = load(tmp_path).info.refuses
    assert refused == {
        "logprobs",
        "prompt_logprobs",
        "logit_bias",
        "allowed_token_ids",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    }
    assert refused <= set(SamplingParams.__slots__)


def test_sampling_settings_leave_the_one_point_distribution_as_it_is(tmp_path: Path) -> None:
    model = load(tmp_path)
    ids = model.encode_prompt("héllo")
    plain = model.generate(Generation(ids, params(9)))
    shaped = SamplingParams(
        max_tokens=9, temperature=1.7, top_p=0.2, top_k=1, min_p=0.9, seed=5, ignore_eos=True
    )
    assert model.generate(Generation(ids, shaped)) == plain
    pieces: list[str] = []
    streamed = model.generate(Generation(ids, shaped, pieces.append))
    assert streamed == plain and "".join(pieces) == plain.text


def test_a_stop_token_ends_the_row_without_its_byte(tmp_path: Path) -> None:
    model = load(tmp_path)
    ids = model.encode_prompt("hello world")
    stop_at_space = SamplingParams(max_tokens=50, stop_token_ids=[ord(" ")])
    pieces: list[str] = []
    result = model.generate(Generation(ids, stop_at_space, pieces.append))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("hello", "stop", 6)
    assert "".join(pieces) == "hello"
    assert model.generate(Generation(ids, stop_at_space)) == result  # the one-go path
    # A byte that never comes leaves the row to run out; so does one past max_tokens.
    never = model.generate(Generation(ids, SamplingParams(max_tokens=4, stop_token_ids=[7])))
    late = model.generate(Generation(ids, SamplingParams(max_tokens=4, stop_token_ids=[ord("o")])))
    assert never.finish_reason == late.finish_reason == "length"
    # A stop byte inside a character: the bytes before it are text, cut short as U+FFFD.
    inside = SamplingParams(max_tokens=9, stop_token_ids=[0xA9])
    pieces.clear()
    cut = model.generate(Generation(model.encode_prompt("hé!"), inside, pieces.append))
    assert (cut.text, cut.finish_reason, cut.completion_tokens) == ("h\ufffd", "stop", 3)
    assert "".join(pieces) == cut.text


def test_a_stop_token_in_a_batch_ends_its_row_alone(tmp_path: Path) -> None:
    model = load(tmp_path)
    stopped, running = Probe("abcdef", 10), Probe("abcdef", 10)
    stopped.row.params = SamplingParams(max_tokens=10, stop_token_ids=[ord("d")])
    model.generate_batch([stopped.row, running.row], None)
    assert stopped.row.result is not None and running.row.result is not None
    assert (stopped.row.result.text, stopped.row.result.finish_reason) == ("abc", "stop")
    assert (running.row.result.text, running.row.result.finish_reason) == ("abcdefabcd", "length")
    assert "".join(stopped.pieces) == "abc"


def test_include_stop_str_in_output_keeps_the_stop_and_holds_nothing_back(
    tmp_path: Path,
) -> None:
    model = load(tmp_path)
    ids = model.encode_prompt("hello world")
    kept = SamplingParams(max_tokens=50, stop=["o w", "zz"], include_stop_str_in_output=True)
    pieces: list[str] = []
    result = model.generate(Generation(ids, kept, pieces.append))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("hello w", "stop", 7)
    assert pieces == list("hello w")  # one piece per token: nothing waited
    # Two stops completed by one token: the one that starts first is cut or kept.
    both = SamplingParams(max_tokens=50, stop=["lo", "llo"])
    assert model.generate(Generation(ids, both)).text == "he"
    both.include_stop_str_in_output = True
    assert model.generate(Generation(ids, both)).text == "hello"
    # A stop token's byte stays out even so.
    token = SamplingParams(
        max_tokens=50, stop_token_ids=[ord("w")], include_stop_str_in_output=True
    )
    assert model.generate(Generation(ids, token)).text == "hello "


def test_nothing_ends_a_row_within_min_tokens(tmp_path: Path) -> None:
    model = load(tmp_path)
    ids = model.encode_prompt("abcabc")
    pieces: list[str] = []
    # "b" completes at tokens 2 and 5: only the second counts with min_tokens 3.
    strings = SamplingParams(max_tokens=20, stop=["b"], min_tokens=3)
    result = model.generate(Generation(ids, strings, pieces.append))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("abca", "stop", 5)
    assert "".join(pieces) == "abca"
    # A stop string begun within them and completed after them does count.
    across = SamplingParams(max_tokens=20, stop=["cab"], min_tokens=4)
    assert model.generate(Generation(ids, across)).text == "ab"
    # A stop token within them is echoed; the next one past them ends the row.
    tokens = SamplingParams(max_tokens=20, stop_token_ids=[ord("a")], min_tokens=3)
    pieces.clear()
    result = model.generate(Generation(ids, tokens, pieces.append))
    assert (result.text, result.finish_reason, result.completion_tokens) == ("abc", "stop", 4)
    assert "".join(pieces) == "abc"  # the first "a" is text
    assert model.generate(Generation(ids, tokens)) == result  # the one-go path
    # min_tokens up to max_tokens: the row runs out as it would anyway.
    full = model.generate(Generation(ids, SamplingParams(max_tokens=4, min_tokens=4)))
    assert (full.text, full.finish_reason) == ("abca", "length")


@pytest.mark.parametrize("asked", [{"min_tokens": 1}, {"ignore_eos": True}])
def test_an_empty_prompt_that_may_not_stop_at_once_is_refused(
    tmp_path: Path, asked: dict[str, Any]
) -> None:
    model = load(tmp_path)
    with pytest.raises(InvalidRequest) as caught:
        model.generate(Generation([], SamplingParams(max_tokens=3, **asked)))
    assert caught.value.param == "prompt"
    refused, fine = Probe("", 3), Probe("ok", 3)
    refused.row.params = SamplingParams(max_tokens=3, stop=["x"], **asked)
    model.generate_batch([refused.row, fine.row], None)
    assert isinstance(refused.row.error, InvalidRequest) and refused.done == 1
    assert fine.row.result is not None and fine.row.result.text == "oko"
    # Asked for nothing (max_tokens 0), it may stop at once.
    nothing = model.generate(Generation([], SamplingParams(max_tokens=0, **asked)))
    assert (nothing.text, nothing.finish_reason) == ("", "stop")


def test_wrong_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        load(tmp_path, task="embed").generate(Generation([97], params(2)))
    with pytest.raises(InvalidRequest):
        load(tmp_path).embed([[97]])


# -- embeddings -----------------------------------------------------------------------


def test_embeddings_are_normalized_and_deterministic(tmp_path: Path) -> None:
    model = load(tmp_path, task="embed")
    assert model.info.task is Task.EMBED
    model.warm_up()
    inputs = [[97, 98], [99], []]
    first = model.embed(inputs)
    again = load(tmp_path, task="embed").embed(inputs)
    assert first == again
    assert len(first) == 3 and all(len(v) == 16 for v in first)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-9 for v in first)
    assert first[0] != first[1]
    assert model.embed([[99]]) == [first[1]]


# -- faults and latency ---------------------------------------------------------------


def test_fail_rate_one_always_fails_and_zero_never(tmp_path: Path) -> None:
    failing = load(tmp_path, fail_rate=1.0)
    for _ in range(20):
        with pytest.raises(BackendError, match="injected failure"):
            failing.generate(Generation([97], params(2)))
    rows = [Probe("a", 2), Probe("b", 2)]
    failing.generate_batch([p.row for p in rows], None)
    assert all(p.done == 1 and isinstance(p.row.error, BackendError) for p in rows)
    with pytest.raises(BackendError, match="injected failure"):
        load(tmp_path, fail_rate=1.0, task="embed").embed([[1]])
    healthy = load(tmp_path, fail_rate=0.0)
    for _ in range(200):
        assert healthy.generate(Generation([97], params(2))).text == "aa"
    embedder = load(tmp_path, fail_rate=0, task="embed")
    for _ in range(50):
        embedder.embed([[1]])


def test_fail_rate_is_reproducible_with_a_seed(tmp_path: Path) -> None:
    def outcomes(seed: int) -> list[bool]:
        model = load(tmp_path, fail_rate=0.5, seed=seed)
        failed = []
        for _ in range(64):
            try:
                model.generate(Generation([97], params(1)))
                failed.append(False)
            except BackendError:
                failed.append(True)
        return failed

    assert outcomes(7) == outcomes(7)
    assert 10 < sum(outcomes(7)) < 54
    assert outcomes(7) != outcomes(8)


def test_latency_ms_is_slept_per_request(tmp_path: Path) -> None:
    model = load(tmp_path, latency_ms=30)
    started = time.perf_counter()
    model.generate(Generation([97], params(2)))
    assert time.perf_counter() - started >= 0.03
    embedder = load(tmp_path, latency_ms=20, task="embed")
    started = time.perf_counter()
    embedder.embed([[1]])
    assert time.perf_counter() - started >= 0.02


# -- end to end through the real app -------------------------------------------------


def echo_spec(tmp: Path, name: str, **options: Any) -> VersionSpec:
    folder = tmp / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    return VersionSpec(name=name, version="1", backend="echo", path=str(folder), options=options)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    models = [
        echo_spec(tmp_path, "echo-lm", context=256),
        echo_spec(tmp_path, "echo-embed", task="embed"),
        echo_spec(tmp_path, "echo-broken", fail_rate=1.0),
    ]
    services = fake_services(tmp_path, FakeBackend(), models, backends=BackendRegistry())
    async with TestClient(TestServer(build_app(services))) as test_client:
        yield test_client


async def sse_events(response: Any) -> list[dict[str, Any]]:
    text = await response.text()
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_completions_through_the_app(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v1/completions", json={"model": "echo-lm", "prompt": "ping", "max_tokens": 6}
    )
    body = await response.json()
    assert response.status == 200, body
    assert response.headers["x-routerd-model"] == "echo-lm@1"
    assert body["choices"][0]["text"] == "pingpi"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}

    response = await client.post(
        "/v1/completions",
        json={"model": "echo-lm", "prompt": "abc", "max_tokens": 5, "stream": True, "stop": "ca"},
    )
    assert response.status == 200
    events = await sse_events(response)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "ab"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_through_the_app(client: TestClient[Any, Any]) -> None:
    messages = [{"role": "user", "content": "hi"}]
    response = await client.post(
        "/v1/chat/completions", json={"model": "echo-lm", "messages": messages, "max_tokens": 8}
    )
    body = await response.json()
    assert response.status == 200, body
    assert body["choices"][0]["message"]["content"] == "user: hi"
    assert body["usage"]["prompt_tokens"] == len("user: hi\n")

    response = await client.post(
        "/v1/chat/completions",
        json={"model": "echo-lm", "messages": messages, "max_tokens": 4, "stream": True},
    )
    assert response.status == 200
    events = await sse_events(response)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == "user"
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_sampling_fields_through_the_app(client: TestClient[Any, Any]) -> None:
    for field, value in (("logprobs", 1), ("presence_penalty", 0.5), ("logit_bias", {"97": 2})):
        body = {"model": "echo-lm", "prompt": "abc", "max_tokens": 3, field: value}
        response = await client.post("/v1/completions", json=body)
        error = (await response.json())["error"]
        assert response.status == 400, error
        assert error["param"] == field
    body = {
        "model": "echo-lm",
        "prompt": "abcd",
        "max_tokens": 9,
        "top_k": 2,
        "min_p": 0.5,
        "stop_token_ids": [ord("d")],
        "min_tokens": 4,
    }
    response = await client.post("/v1/completions", json=body)
    answer = await response.json()
    assert response.status == 200, answer
    assert answer["choices"][0]["text"] == "abcdabc"
    assert answer["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_and_failures_through_the_app(client: TestClient[Any, Any]) -> None:
    response = await client.post(
        "/v1/embeddings", json={"model": "echo-embed", "input": ["a", "b"]}
    )
    body = await response.json()
    assert response.status == 200, body
    assert [len(d["embedding"]) for d in body["data"]] == [16, 16]

    response = await client.post(
        "/v1/completions", json={"model": "echo-broken", "prompt": "x", "max_tokens": 2}
    )
    body = await response.json()
    assert response.status >= 500
    assert "injected failure" in body["error"]["message"]
    again = await client.post(
        "/v1/completions", json={"model": "echo-lm", "prompt": "x", "max_tokens": 2}
    )
    assert again.status == 200  # a failing model disturbs no other
