"""Answers are encoded as ``json.dumps`` would encode them (``routerd.api.answers``)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from routerd.api import answers

PAYLOADS: list[Any] = [
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "choices": [{"index": 0, "text": 'héllo ☃ "quoted"\n', "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    },
    {"data": [{"embedding": [0.1, -2.5e-8, 1e300, 0.0, -0.0]}], "flag": True, "none": None},
    {"nan": math.nan, "inf": math.inf, "empty": {}, "list": [], "nested": [[1, [2, {}]]]},
    {"\u2028key": "\x00\x1f\ud83d", 1: "int key", 2.5: "float key"},
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_answers_are_encoded_as_json_dumps_encodes_them(payload: Any) -> None:
    assert answers.to_json(payload) == json.dumps(payload)


def test_a_value_json_cannot_encode_is_refused() -> None:
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        answers.to_json({"bad": {1, 2}})


def test_without_the_c_encoder_the_plain_encoder_gives_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    encode = answers._json_encoder()
    for payload in PAYLOADS:
        assert encode(payload) == json.dumps(payload)
