"""Request parsing: accepted shapes, refused shapes, and the param each error names."""

from __future__ import annotations

import pytest

from routerd.api.schemas import parse_chat, parse_completion, parse_embedding
from routerd.errors import BadRequest


def test_completion_defaults():
    req = parse_completion({"model": " m ", "prompt": "hi"})
    assert req.model == "m"
    assert req.prompts == ["hi"]
    assert req.sampling.max_tokens == 16
    assert (
        req.sampling.params.temperature,
        req.sampling.params.top_p,
        req.sampling.params.seed,
    ) == (1.0, 1.0, None)
    assert req.stream is False and req.include_usage is False


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_shapes(prompt, expected):
    assert parse_completion({"model": "m", "prompt": prompt}).prompts == expected


@pytest.mark.parametrize("prompt", [None, [], [[]], ["a", 1], [True], {"x": 1}, [-1]])
def test_bad_prompts(prompt):
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "m", "prompt": prompt})
    assert caught.value.param.startswith("prompt")


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = parse_completion(
        {
            "model": "m",
            "prompt": "x",
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "logprobs": None,
            "echo": False,
            "n": 1,
            "best_of": 1,
            "user": "u",
        }
    )
    assert req.user == "u"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("suffix", "x"),
        ("use_beam_search", True),
        ("response_format", {"type": "json_object"}),
        ("priority", 3),
        ("n", 0),
        ("best_of", 0),
        ("logprobs", 6),
        ("logprobs", True),
        ("top_k", -2),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("presence_penalty", 2.5),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 101}),
        ("allowed_token_ids", []),
        ("stop_token_ids", [-1]),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
        ("prompt_logprobs", 21),
        ("truncate_prompt_tokens", 0),
    ],
)
def test_refused_or_out_of_range_values_name_their_field(field, value):
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "m", "prompt": "x", field: value})
    assert caught.value.param == field


def test_of_several_refused_fields_the_same_one_is_named_whatever_their_order():
    refused = {"suffix": "x", "use_beam_search": True, "bad_words": ["a"], "priority": 1}
    for body in (refused, dict(reversed(refused.items()))):
        with pytest.raises(BadRequest) as caught:
            parse_completion({"model": "m", "prompt": "x", **body})
        assert caught.value.param == "use_beam_search"  # the first in the table's order


def test_every_sampling_field_reaches_the_params():
    req = parse_completion(
        {
            "model": "m",
            "prompt": "x",
            "max_tokens": 9,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.1,
            "seed": 4,
            "presence_penalty": 0.2,
            "frequency_penalty": -0.3,
            "repetition_penalty": 1.2,
            "logit_bias": {"12": 5, "3": -100},
            "allowed_token_ids": [3, 12, 40],
            "ignore_eos": True,
            "min_tokens": 2,
            "stop": ["a", "b"],
            "stop_token_ids": [40],
            "include_stop_str_in_output": True,
            "logprobs": 3,
            "echo": True,
            "prompt_logprobs": 1,
            "n": 2,
            "best_of": 3,
        }
    )
    p = req.sampling.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 7, 0.1, 4)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.2, -0.3, 1.2)
    assert p.logit_bias == {12: 5.0, 3: -100.0} and list(p.allowed_token_ids or []) == [3, 12, 40]
    assert p.ignore_eos and p.min_tokens == 2 and p.include_stop_str_in_output
    assert tuple(p.stop) == ("a", "b") and tuple(p.stop_token_ids) == (40,)
    assert p.logprobs == 3 and p.prompt_logprobs == 3  # echo with logprobs 3 widens it
    assert (req.n, req.best_of, req.echo, req.logprobs, req.prompt_logprobs) == (2, 3, True, 3, 1)
    assert req.sampling.max_tokens == 9


def test_top_k_off_and_chat_logprobs():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_chat({**chat, "top_k": -1}).sampling.params.top_k == 0
    req = parse_chat({**chat, "logprobs": True, "top_logprobs": 20})
    assert req.logprobs == 20 and req.sampling.params.logprobs == 20
    assert parse_chat({**chat, "logprobs": True}).logprobs == 0
    assert parse_chat({**chat, "logprobs": False}).logprobs is None
    with pytest.raises(BadRequest) as caught:
        parse_chat({**chat, "top_logprobs": 2})
    assert caught.value.param == "top_logprobs"


def test_best_of_below_n_streamed_best_of_and_bare_max_tokens_zero_are_refused():
    base = {"model": "m", "prompt": "x"}
    for body, param in (
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ):
        with pytest.raises(BadRequest) as caught:
            parse_completion({**base, **body})
        assert caught.value.param == param
    req = parse_completion({**base, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert req.sampling.max_tokens == 0 and req.sampling.params.prompt_logprobs == 1
    ranked = parse_completion({**base, "best_of": 3}).sampling.params
    assert ranked.logprobs == 0  # best_of ranks by log-probability, so the model returns them


def test_the_stop_limit_is_the_configured_one():
    stops = [f"s{i}" for i in range(32)]
    assert (
        len(parse_completion({"model": "m", "prompt": "x", "stop": stops}).sampling.params.stop)
        == 32
    )
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "m", "prompt": "x", "stop": [*stops, "t"]})
    assert caught.value.param == "stop" and "32" in caught.value.message
    with pytest.raises(BadRequest):
        parse_completion({"model": "m", "prompt": "x", "stop": ["a", "b"]}, max_stop=1)
    with pytest.raises(BadRequest) as caught:
        parse_chat(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "stop_token_ids": [1, 2],
            },
            max_stop=1,
        )
    assert caught.value.param == "stop_token_ids"


def test_routing_key_falls_back_to_safety_identifier_then_prompt_cache_key():
    base = {"model": "m", "prompt": "x"}
    assert parse_completion({**base, "prompt_cache_key": "c"}).user == "c"
    assert parse_completion({**base, "safety_identifier": "s", "prompt_cache_key": "c"}).user == "s"
    assert parse_completion({**base, "user": "u", "safety_identifier": "s"}).user == "u"


@pytest.mark.parametrize(
    "body", [{"max_completion_tokens": 7}, {"max_tokens": 5, "max_completion_tokens": 7}]
)
def test_completion_refuses_max_completion_tokens_rather_than_ignore_it(body):
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "m", "prompt": "x", **body})
    assert caught.value.param == "max_completion_tokens"
    assert "max_tokens" in caught.value.message
    assert parse_completion({"model": "m", "prompt": "x", "max_completion_tokens": None})


def test_chat_prefers_max_completion_tokens_and_joins_text_parts():
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stop": ["x", "y"],
            "seed": 3,
        }
    )
    assert req.sampling.max_tokens == 7
    assert req.sampling.max_tokens is not None
    assert req.messages[1] == {"role": "user", "content": "ab"}
    assert req.messages[2]["content"] == ""
    assert req.sampling.params.stop == ("x", "y") and req.sampling.params.seed == 3
    assert (
        parse_chat(
            {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        ).sampling.max_tokens
        is None
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content"),
        (["hello"], "messages[0]"),
    ],
)
def test_bad_messages(messages, param):
    with pytest.raises(BadRequest) as caught:
        parse_chat({"model": "m", "messages": messages})
    assert caught.value.param == param


def test_embedding_fields():
    req = parse_embedding({"model": "e", "input": ["a", "b"], "encoding_format": "base64"})
    assert req.inputs == ["a", "b"] and req.encoding_format == "base64"
    with pytest.raises(BadRequest) as caught:
        parse_embedding({"model": "e", "input": "a", "encoding_format": "int8"})
    assert caught.value.param == "encoding_format"
    with pytest.raises(BadRequest) as caught:
        parse_embedding({"model": "e", "input": "a", "dimensions": 8})
    assert caught.value.param == "dimensions"


@pytest.mark.parametrize(
    ("parse", "body", "ignored"),
    [
        (parse_completion, {"model": "m", "prompt": "x", "temprature": 0.5}, ("temprature",)),
        (parse_completion, {"model": "m", "prompt": "x", "zeta": 1, "alpha": 2}, ("alpha", "zeta")),
        (
            parse_chat,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "foo": 1},
            ("foo",),
        ),
        (parse_embedding, {"model": "m", "input": "x", "messages": []}, ("messages",)),
    ],
)
def test_fields_outside_both_schemas_are_ignored_and_named(parse, body, ignored):
    assert parse(body).ignored == ignored
    known = {k: v for k, v in body.items() if k not in ignored}
    assert parse(known).ignored == ()


def test_every_field_an_endpoint_knows_is_accepted_at_its_default():
    from routerd.api.schemas import CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS

    neutral = {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    for parse, fields in (
        (parse_completion, COMPLETION_FIELDS),
        (parse_chat, CHAT_FIELDS),
        (parse_embedding, EMBEDDING_FIELDS),
    ):
        body = {key: None for key in fields} | {
            key: value for key, value in neutral.items() if key in fields
        }
        if parse is parse_embedding:
            body["input"] = "x"
        assert parse(body).model == "m"
