"""The OpenAI API over the real app wiring, with a fake backend behind the scheduler."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from routerd.api.keys import SERVICES
from routerd.app import build_app
from tests.fakes import FakeBackend
from tests.support import fake_services, fake_spec


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def client(tmp_path: Path, backend: FakeBackend):
    models = [
        fake_spec(tmp_path, "echo"),
        fake_spec(tmp_path, "echo", "2"),
        fake_spec(tmp_path, "slow", token_delay=0.01, context=4096),
        fake_spec(tmp_path, "embedder", task="embed"),
        fake_spec(tmp_path, "broken", fail_load="no weights in folder"),
    ]
    app = build_app(fake_services(tmp_path, backend, models, server=_small_body_server()))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _small_body_server():
    from routerd.config import ServerConfig

    return ServerConfig(max_body_bytes=64 * 1024)


def assert_openai_error(body: dict, *, param: str | None = None, code: str | None = None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


async def sse_events(response) -> list:
    text = await response.text()
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# -- models -----------------------------------------------------------------------


async def test_models_list_each_name_once_with_its_versions(client):
    response = await client.get("/v1/models")
    assert response.status == 200
    data = (await response.json())["data"]
    ids = [m["id"] for m in data]
    assert len(ids) == len(set(ids)) and "echo@1" not in ids
    assert {"echo", "embedder"} <= set(ids)
    echo = next(m for m in data if m["id"] == "echo")
    assert echo["versions"] == ["echo@1", "echo@2"]
    assert echo["root"] in echo["versions"]
    one = await client.get("/v1/models/echo@2")  # a version is still servable by its id
    assert (await one.json())["id"] == "echo@2"


async def test_unknown_model_is_404_model_not_found(client):
    response = await client.get("/v1/models/nope")
    assert response.status == 404
    assert_openai_error(await response.json(), param="model", code="model_not_found")
    response = await client.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
    assert response.status == 404
    assert_openai_error(await response.json(), code="model_not_found")


# -- completions ------------------------------------------------------------------


async def test_completion_names_what_served_it(client):
    response = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": "abc", "max_tokens": 5}
    )
    assert response.status == 200
    body = await response.json()
    assert response.headers["x-routerd-model"] == "echo@2"
    assert response.headers["x-routerd-device"] == "cpu"
    assert int(response.headers["x-routerd-cold-start-ms"]) >= 0
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "cbacb"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    again = await client.post("/v1/completions", json={"model": "echo@1", "prompt": "abc"})
    assert again.headers["x-routerd-model"] == "echo@1"


async def test_completion_stop_and_token_array_prompts(client):
    response = await client.post(
        "/v1/completions",
        json={"model": "echo", "prompt": [[97, 98, 99], [120, 121]], "max_tokens": 4, "stop": "a"},
    )
    body = await response.json()
    assert response.status == 200, body
    assert [c["text"] for c in body["choices"]] == ["cb", "yxyx"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert [c["index"] for c in body["choices"]] == [0, 1]


async def test_completion_streaming_ends_with_done_and_usage(client):
    response = await client.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": "xyz",
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["x-routerd-model"] == "echo@2"
    events = await sse_events(response)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == "zyxz"
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 4


async def test_prompt_longer_than_context_is_400(client):
    response = await client.post("/v1/completions", json={"model": "echo", "prompt": "x" * 100})
    assert response.status == 400
    assert_openai_error(await response.json(), param="prompt", code="context_length_exceeded")
    response = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": "x" * 60, "max_tokens": 10}
    )
    assert response.status == 400


async def test_token_ids_outside_the_vocabulary_are_400(client):
    response = await client.post("/v1/completions", json={"model": "echo", "prompt": [1, 999]})
    assert response.status == 400
    assert_openai_error(await response.json(), param="prompt")


# -- chat -------------------------------------------------------------------------


async def test_chat_completion(client):
    response = await client.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    body = await response.json()
    assert response.status == 200, body
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"] == " :t"
    assert body["object"] == "chat.completion"


async def test_chat_streaming_sends_role_then_content_then_finish(client):
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3,
            "stream": True,
        },
    )
    events = await sse_events(response)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == " :t"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events)


# -- embeddings -------------------------------------------------------------------


async def test_embeddings_float_and_base64_agree(client):
    floats = await client.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "bb"]})
    body = await floats.json()
    assert floats.status == 200, body
    assert floats.headers["x-routerd-model"] == "embedder@1"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    packed = await client.post(
        "/v1/embeddings",
        json={"model": "embedder", "input": [[97], [98, 98]], "encoding_format": "base64"},
    )
    for as_float, as_b64 in zip(body["data"], (await packed.json())["data"], strict=True):
        raw = base64.b64decode(as_b64["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(as_float["embedding"], abs=1e-6)


async def test_embedding_input_too_long_or_outside_the_vocabulary_is_400(client):
    long = "x" * 100  # the fake embedder's context is 64 tokens
    response = await client.post(
        "/v1/embeddings", json={"model": "embedder", "input": ["ok", long]}
    )
    assert response.status == 400
    assert_openai_error(await response.json(), param="input[1]", code="context_length_exceeded")
    response = await client.post("/v1/embeddings", json={"model": "embedder", "input": [[999]]})
    assert response.status == 400
    assert_openai_error(await response.json(), param="input")
    response = await client.post("/v1/embeddings", json={"model": "embedder", "input": "ok"})
    assert response.status == 200, "a bad request leaves the model serving"


async def test_endpoint_and_model_task_must_match(client):
    response = await client.post("/v1/embeddings", json={"model": "echo", "input": "x"})
    assert response.status == 400
    assert_openai_error(await response.json(), param="model")
    response = await client.post("/v1/completions", json={"model": "embedder", "prompt": "x"})
    assert response.status == 400


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "echo", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "echo", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "echo", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "echo", "prompt": "x", "n": 0}, "n"),
        ({"model": "echo", "prompt": "x", "stop": ["a", 1]}, "stop"),
        ({"model": "echo", "prompt": []}, "prompt"),
        ({"model": "echo", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "echo", "prompt": "x", "logprobs": 3}, "logprobs"),
        ({"model": "echo", "prompt": "x", "max_completion_tokens": 2}, "max_completion_tokens"),
        ({"model": "echo", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "echo", "prompt": "x", "presence_penalty": 1}, "presence_penalty"),
        (
            {"model": "echo", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
    ],
)
async def test_bad_fields_are_400_naming_the_param(client, body, param):
    response = await client.post("/v1/completions", json=body)
    assert response.status == 400
    assert_openai_error(await response.json(), param=param)


async def test_n_choices_and_several_prompts_stream_each_with_its_index(client):
    body = {"model": "echo", "prompt": ["ab", "cd"], "max_tokens": 3, "n": 2, "stream": True}
    response = await client.post(
        "/v1/completions", json={**body, "stream_options": {"include_usage": True}, "zz": 1}
    )
    assert response.status == 200
    assert response.headers["x-routerd-ignored-fields"] == "zz"
    events = await sse_events(response)
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert texts == {0: "bab", 1: "bab", 2: "dcd", 3: "dcd"}
    assert all(f[-1] == "length" and f.count("length") == 1 for f in finishes.values())
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    whole = await (await client.post("/v1/completions", json={**body, "stream": False})).json()
    assert [(c["index"], c["text"]) for c in whole["choices"]] == sorted(texts.items())
    assert whole["usage"]["prompt_tokens"] == 4  # each prompt once, however many choices


async def test_echo_puts_the_prompt_before_the_completion(client):
    for prompt in ("ab", [97, 98]):
        body = {"model": "echo", "prompt": prompt, "max_tokens": 2, "echo": True}
        whole = await (await client.post("/v1/completions", json=body)).json()
        assert whole["choices"][0]["text"] == "abba"
        streamed = await sse_events(
            await client.post("/v1/completions", json={**body, "stream": True})
        )
        assert streamed[0]["choices"][0]["text"] == "ab"
        assert "".join(e["choices"][0]["text"] for e in streamed) == "abba"


async def test_a_field_the_model_cannot_honour_is_refused_by_name(client):
    for body, param in (
        ({"prompt": "x", "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "echo": True, "logprobs": 0}, "logprobs"),
        ({"prompt": "x", "top_k": 3}, "top_k"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ):
        endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        response = await client.post(endpoint, json={"model": "echo", **body})
        assert response.status == 400, body
        assert_openai_error(await response.json(), param=param)


async def test_an_endpoint_the_model_cannot_serve_is_refused_before_any_load(client, backend):
    chat = {"model": "embedder", "messages": [{"role": "user", "content": "x"}]}
    for body in (chat, {**chat, "stream": True}):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status == 400
        error = await response.json()
        assert_openai_error(error, param="model")
        assert "computes embeddings" in error["error"]["message"]
    response = await client.post("/v1/embeddings", json={"model": "echo", "input": "x"})
    assert response.status == 400
    assert "generates text" in (await response.json())["error"]["message"]
    assert backend.loads == []


async def test_prompt_logprobs_are_not_streamed(client):
    body = {"model": "echo", "prompt": "x", "prompt_logprobs": 1, "stream": True}
    response = await client.post("/v1/completions", json=body)
    assert response.status == 400
    assert_openai_error(await response.json(), param="prompt_logprobs")


async def test_fields_outside_both_schemas_are_ignored_but_named(client, caplog):
    body = {"model": "echo", "prompt": "x", "max_token": 2, "temprature": 0}
    with caplog.at_level("WARNING", logger="routerd.api"):
        response = await client.post("/v1/completions", json=body)
    assert response.status == 200
    assert response.headers["x-routerd-ignored-fields"] == "max_token, temprature"
    assert "max_token, temprature" in caplog.text
    known = await client.post("/v1/completions", json={"model": "echo", "prompt": "x"})
    assert "x-routerd-ignored-fields" not in known.headers


async def test_malformed_json_is_400_and_daemon_keeps_serving(client):
    response = await client.post(
        "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    assert_openai_error(await response.json())
    response = await client.post("/v1/completions", data=b"[1,2]")
    assert response.status == 400
    ok = await client.post("/v1/completions", json={"model": "echo", "prompt": "a"})
    assert ok.status == 200


async def test_body_too_large_is_413(client):
    response = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": "x" * (70 * 1024)}
    )
    assert response.status == 413
    assert_openai_error(await response.json(), code="request_too_large")


async def test_unknown_route_and_wrong_method_are_openai_shaped(client):
    response = await client.get("/v1/nothing-here")
    assert response.status == 404
    assert_openai_error(await response.json())
    response = await client.get("/v1/completions")
    assert response.status == 405
    assert_openai_error(await response.json())


async def test_failed_load_is_503_with_reason_and_others_still_serve(client):
    response = await client.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert response.status == 503
    body = await response.json()
    assert_openai_error(body, code="model_load_failed")
    assert "no weights in folder" in body["error"]["message"]
    ok = await client.post("/v1/completions", json={"model": "echo", "prompt": "a"})
    assert ok.status == 200
    ready = await client.get("/ready")
    assert ready.status == 200


async def test_request_to_loaded_model_is_answered_while_another_loads(client, backend):
    assert (
        await client.post("/v1/completions", json={"model": "echo", "prompt": "a"})
    ).status == 200
    backend.load_gate.clear()
    try:
        pending = asyncio.create_task(
            client.post("/v1/completions", json={"model": "slow", "prompt": "a"})
        )
        async with asyncio.timeout(5):
            while "slow@1" not in backend.loads:
                await asyncio.sleep(0.01)
        answered = await asyncio.wait_for(
            client.post("/v1/completions", json={"model": "echo", "prompt": "b"}), timeout=3
        )
        assert answered.status == 200
        assert not pending.done()
    finally:
        backend.load_gate.set()
    assert (await pending).status == 200


async def test_client_leaving_mid_stream_cancels_generation_and_returns_lease(client, backend):
    response = await client.post(
        "/v1/completions",
        json={"model": "slow", "prompt": "abc", "max_tokens": 2000, "stream": True},
    )
    assert response.status == 200
    await response.content.readline()
    response.close()
    scheduler = client.app[SERVICES].scheduler
    async with asyncio.timeout(5):
        while scheduler.instance("slow@1").in_flight:
            await asyncio.sleep(0.01)
    assert backend.generated >= 1  # the generation returned (cancelled), not ran to 2000


# -- health -----------------------------------------------------------------------


async def test_health_and_ready(client):
    assert (await client.get("/health")).status == 200
    ready = await client.get("/ready")
    assert ready.status == 200
    assert (await ready.json())["checks"] == {"store": True, "scheduler": True, "accepting": True}
    client.app[SERVICES].live.accepting = False
    not_ready = await client.get("/ready")
    assert not_ready.status == 503
    client.app[SERVICES].live.accepting = True
