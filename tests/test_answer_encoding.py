"""Answers reach clients as JSON that decodes to exactly what the handler built
(``routerd.api.answers.to_json``), whatever text a model produced."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from contract.errors import BackendError
from routerd.api import answers, openai
from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec

CONTROL = "".join(chr(c) for c in range(0x20)) + "\x7f"

PAYLOADS: list[Any] = [
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "choices": [{"index": 0, "text": 'héllo ☃ "quoted" \\ back\n', "logprobs": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    },
    {"data": [{"embedding": [0.1, -2.5e-8, 1e300, 0.0, 1 / 3]}], "flag": True, "none": None},
    {"empty": {}, "list": [], "nested": [[1, [2, {}]]], "big": 2**63 - 1, "neg": -(2**63)},
    {
        "\u2028key\u2029": "line separators, which JavaScript once took for newlines",
        "control": CONTROL,
        "emoji": "👋🏽 family 👨‍👩‍👧",
        "scripts": "Ελληνικά 日本語 العربية עברית",
        "nul": "\x00",
    },
]


def _decoded(payload: Any) -> Any:
    encoded = answers.to_json(payload)
    assert isinstance(encoded, bytes)
    return json.loads(encoded.decode("utf-8"))  # strict: a bad byte raises


@pytest.mark.parametrize("payload", PAYLOADS)
def test_an_answer_decodes_to_exactly_its_payload(payload: Any) -> None:
    assert _decoded(payload) == payload


def test_floats_come_back_as_the_same_doubles() -> None:
    floats = [0.1, 1 / 3, -2.5e-8, 5e-324, 1.7976931348623157e308, -0.0, 123456789.125]
    decoded = _decoded({"embedding": floats})["embedding"]
    assert [x.hex() for x in decoded] == [x.hex() for x in floats]


def test_text_is_sent_as_utf8_and_control_characters_escaped() -> None:
    encoded = answers.to_json({"text": "é☃👋" + CONTROL})
    assert "é☃👋".encode() in encoded  # no \\u escapes for text JSON may carry as it is
    assert not any(byte < 0x20 for byte in encoded)  # raw control bytes would be invalid JSON
    assert b"\\n" in encoded and b"\\u0000" in encoded


def test_an_answer_is_one_line_so_a_stream_chunk_cannot_break_its_event() -> None:
    encoded = answers.to_json({"text": "one\ntwo\r\nthree", "nested": {"a": [1, 2]}})
    assert b"\n" not in encoded and b"\r" not in encoded


@pytest.mark.parametrize(
    "payload",
    [
        {"bad": {1, 2}},  # a set
        {1: "an int key"},
        {"text": "\ud83d"},  # a lone surrogate, no UTF-8 for it
    ],
)
def test_a_value_json_cannot_carry_is_refused(payload: Any) -> None:
    with pytest.raises(TypeError):
        answers.to_json(payload)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_encoder_writes_non_finite_floats_as_null(value: float) -> None:
    """Valid JSON either way; the embeddings handler refuses such vectors first."""
    assert _decoded({"x": [value, 1.0]}) == {"x": [None, 1.0]}


def test_an_embedding_is_checked_element_by_element_where_its_sum_overflows() -> None:
    huge = [1e308, 1e308, -1.0]  # finite, though their sum is an infinity
    assert openai._encode(huge, "float") == huge
    for poisoned in ([1e308, 1e308, math.nan], [math.inf, -math.inf], [0.5, math.nan]):
        with pytest.raises(BackendError, match="NaN or an infinity"):
            openai._encode(poisoned, "float")


# -- what clients receive -------------------------------------------------------------


async def _post_embeddings(tmp_path: Path, poison: str | None = None, **body: Any) -> Any:
    """POST two inputs to an embedder whose first vector holds ``poison`` if given."""
    options = {"task": "embed"} if poison is None else {"task": "embed", "embed_poison": poison}
    models = [fake_spec(tmp_path, "embedder", **options)]
    app = build_app(fake_services(tmp_path, FakeBackend(), models))
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/v1/embeddings", json={"model": "embedder", "input": ["a", "b"], **body}
        )
        return response.status, response.headers["Content-Type"], await response.read()


async def test_an_answer_is_json_with_its_content_type(tmp_path: Path) -> None:
    status, content_type, raw = await _post_embeddings(tmp_path)
    assert (status, content_type) == (200, "application/json")
    body = json.loads(raw.decode("utf-8"))
    assert [len(d["embedding"]) for d in body["data"]] == [3, 3]


@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
async def test_a_non_finite_embedding_is_a_server_error_not_null(
    tmp_path: Path, poison: str
) -> None:
    status, content_type, raw = await _post_embeddings(tmp_path, poison)
    assert (status, content_type) == (500, "application/json; charset=utf-8")
    error = json.loads(raw)["error"]
    assert error["type"] == "server_error"
    assert "NaN or an infinity" in error["message"] and "base64" in error["message"]


async def test_base64_carries_a_non_finite_embedding_as_the_float_it_is(tmp_path: Path) -> None:
    status, _, raw = await _post_embeddings(tmp_path, "inf", encoding_format="base64")
    assert status == 200
    packed = base64.b64decode(json.loads(raw)["data"][0]["embedding"])
    assert struct.unpack("<3f", packed)[1] == math.inf
