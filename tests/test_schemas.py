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
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.seed) == (1.0, 1.0, None)
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
        ("echo", True),
        ("best_of", 2),
        ("frequency_penalty", 0.5),
        ("logprobs", True),
        ("suffix", "x"),
        ("n", 0),
    ],
)
def test_unsupported_values_are_refused(field, value):
    with pytest.raises(BadRequest) as caught:
        parse_completion({"model": "m", "prompt": "x", field: value})
    assert caught.value.param == field


def test_of_several_unsupported_fields_the_same_one_is_named_whatever_their_order():
    unsupported = {"suffix": "x", "echo": True, "best_of": 2, "logprobs": True}
    for body in (unsupported, dict(reversed(unsupported.items()))):
        with pytest.raises(BadRequest) as caught:
            parse_completion({"model": "m", "prompt": "x", **body})
        assert caught.value.param == "logprobs"  # the first of the fields routerd refuses


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
    assert req.sampling.stop == ("x", "y") and req.sampling.seed == 3
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
    ("parse", "body", "field"),
    [
        (parse_completion, {"model": "m", "prompt": "x", "temprature": 0.5}, "temprature"),
        (
            parse_completion,
            {"model": "m", "prompt": "x", "response_format": None},
            "response_format",
        ),
        (parse_completion, {"model": "m", "prompt": "x", "zeta": 1, "alpha": 2}, "alpha"),
        (
            parse_chat,
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "foo": 1},
            "foo",
        ),
        (parse_chat, {"model": "m", "messages": [], "prompt": "x"}, "prompt"),
        (parse_embedding, {"model": "m", "input": "x", "messages": []}, "messages"),
    ],
)
def test_unrecognized_fields_are_refused_by_name_not_ignored(parse, body, field):
    with pytest.raises(BadRequest) as caught:
        parse(body)
    assert caught.value.param == field
    assert str(caught.value) == f"Unrecognized request argument supplied: {field}"


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
