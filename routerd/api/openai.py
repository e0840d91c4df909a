"""The OpenAI-compatible API: models, completions, chat completions, embeddings.

Each handler follows the request path of DESIGN.md: parse and validate the body,
route the model id to a version (``routerd.api.traffic``: weighted sticky split,
shadow copy), hold a scheduler lease for the whole response (streaming included),
run the work on the instance's thread.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import random
import struct
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from backends.base import BackendError, GenerationResult, Task
from routerd.api.coldstart import ColdStream
from routerd.api.errors import as_routerd_error, error_body, read_json_object
from routerd.api.generation import (
    Finished,
    PreparedPrompt,
    embedding_inputs,
    estimate_tokens,
    fit_to_context,
    generate,
    max_tokens_cap,
    stream,
    tokenize,
)
from routerd.api.limits import claim_stream, streaming
from routerd.api.schemas import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from routerd.api.traffic import mark_stream_failed, route_request
from routerd.errors import BadRequest, ModelNotFound
from routerd.metrics import note_cold_start, note_first_token, note_usage
from routerd.scheduler import Lease
from routerd.services import SERVICES, Services
from state import VersionRecord

routes = web.RouteTableDef()


# Response ids need to be unique, not secret: 128 bits from a generator seeded once
# from the OS, rather than a system call for every response.
_ID_BITS = random.Random(os.urandom(32)).getrandbits


def _response_id(prefix: str) -> str:
    """A unique response id: 128 random bits, as a uuid4 has, without building a UUID."""
    return f"{prefix}-{_ID_BITS(128):032x}"


def _served_headers(record: VersionRecord, lease: Lease) -> dict[str, str]:
    """Which version and device served the request, and its cold start if it had one
    (also noted for metrics)."""
    headers = {
        "x-routerd-model": record.model_id,
        "x-routerd-device": lease.instance.device,
    }
    if lease.cold_start_ms is not None:
        headers["x-routerd-cold-start-ms"] = f"{lease.cold_start_ms:.0f}"
        note_cold_start(lease.cold_start_ms)
    return headers


_to_json: Callable[[Any], bytes] = orjson.dumps
"""Answers and stream chunks as compact UTF-8 JSON bytes, ready to send.

Encoding is a good part of what a served request costs routerd, and orjson does it
in one C call straight to bytes, where ``json.dumps`` builds an encoder per call and
returns text that must then be encoded again. What it refuses is a TypeError
(``orjson.JSONEncodeError``): a type it does not know (a set, say), a key that is not
a string, text with a lone surrogate. NaN and infinities come out as ``null``, so an
answer that could carry them checks its floats first (``_encode``).
"""


def _answer(payload: dict[str, Any], headers: dict[str, str]) -> web.Response:
    """A served request's JSON answer, encoded once straight to bytes (``json_response``
    encodes to text, which the response then encodes again, and sets the content type
    through a parser)."""
    headers["Content-Type"] = "application/json"
    return web.Response(body=_to_json(payload), headers=headers)


_TASK_WORDS = {Task.GENERATE: "generates text", Task.EMBED: "computes embeddings"}


def _require_task(lease: Lease, task: Task, model_id: str, endpoint: str) -> None:
    if lease.instance.model.info.task is not task:
        raise BadRequest(
            f"model '{model_id}' {_TASK_WORDS[lease.instance.model.info.task]} and cannot "
            f"serve {endpoint}",
            param="model",
        )


# -- models ----------------------------------------------------------------------


def _model_entry(model_id: str, record: VersionRecord) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(record.created_at),
        "owned_by": "routerd",
        "root": record.model_id,
    }


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    table = request.app[SERVICES].router.table
    data = [_model_entry(name, record) for name, record in sorted(table.latest.items())]
    data += [_model_entry(mid, record) for mid, record in sorted(table.versions.items())]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model_id}")
async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    try:
        record = request.app[SERVICES].router.resolve(model_id)
    except ModelNotFound:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None
    return web.json_response(_model_entry(model_id, record))


# -- completions -----------------------------------------------------------------


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    req = parse_completion(await read_json_object(request))
    if req.stream:
        claim_stream()
    shadow = functools.partial(_shadow_completion, services, req)
    record = route_request(request, req.model, req.user, shadow)
    cold = _cold_stream(request, services, record, stream=req.stream)
    try:
        async with cold.lease(services.scheduler, keep_alive=req.keep_alive) as lease:
            _require_task(lease, Task.GENERATE, req.model, "/v1/completions")
            prompts = [await _prepare(lease, req, p, param="prompt") for p in req.prompts]
            if req.stream:
                return await _stream_completion(request, req, record, lease, prompts, cold.response)
            results = [await generate(lease.instance, p) for p in prompts]
    except Exception as exc:
        if cold.response is None:
            raise
        mark_stream_failed()
        return await cold.fail(exc)
    return _answer(
        {
            "id": _response_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "text": r.text,
                    "logprobs": None,
                    "finish_reason": _finish(r),
                }
                for i, r in enumerate(results)
            ],
            "usage": _usage(results),
        },
        headers=_served_headers(record, lease),
    )


def _cold_stream(
    request: web.Request, services: Services, record: VersionRecord, *, stream: bool
) -> ColdStream:
    heartbeat = services.config.server.stream_heartbeat
    return ColdStream(request, record, stream=stream, heartbeat=heartbeat)


async def _shadow_completion(
    services: Services, req: CompletionRequest, record: VersionRecord
) -> None:
    """The same completion on a shadow version; the result is discarded."""
    async with services.scheduler.lease(record) as lease:
        _require_task(lease, Task.GENERATE, record.model_id, "/v1/completions")
        for prompt in req.prompts:
            await generate(lease.instance, await _prepare(lease, req, prompt, param="prompt"))


async def _prepare(
    lease: Lease, req: CompletionRequest, prompt: str | list[int], *, param: str
) -> PreparedPrompt:
    token_ids = await tokenize(lease.instance, prompt, param=param)
    info = lease.instance.model.info
    params = fit_to_context(
        info, len(token_ids), req.sampling, param=param, cap=max_tokens_cap(lease.instance)
    )
    return PreparedPrompt(token_ids, params)


async def _stream_completion(
    request: web.Request,
    req: CompletionRequest,
    record: VersionRecord,
    lease: Lease,
    prompts: list[PreparedPrompt],
    begun: web.StreamResponse | None,
) -> web.StreamResponse:
    completion_id = _response_id("cmpl")
    created = int(time.time())

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    return await _write_sse(
        request,
        req.include_usage,
        record,
        lease,
        prompts,
        chunk,
        usage_chunk=chunk(0, "", None),
        begun=begun,
    )


# -- chat ------------------------------------------------------------------------


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    req = parse_chat(await read_json_object(request))
    if req.stream:
        claim_stream()
    shadow = functools.partial(_shadow_chat, services, req)
    record = route_request(request, req.model, req.user, shadow)
    cold = _cold_stream(request, services, record, stream=req.stream)
    try:
        async with cold.lease(services.scheduler, keep_alive=req.keep_alive) as lease:
            _require_task(lease, Task.GENERATE, req.model, "/v1/chat/completions")
            prompt = await _prepare_chat(lease, req)
            if req.stream:
                return await _stream_chat(request, req, record, lease, prompt, cold.response)
            result = await generate(lease.instance, prompt)
    except Exception as exc:
        if cold.response is None:
            raise
        mark_stream_failed()
        return await cold.fail(exc)
    return _answer(
        {
            "id": _response_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": _finish(result),
                }
            ],
            "usage": _usage([result]),
        },
        headers=_served_headers(record, lease),
    )


async def _prepare_chat(lease: Lease, req: ChatRequest) -> PreparedPrompt:
    model = lease.instance.model
    token_ids = await lease.instance.call(model.encode_chat, req.messages)
    params = fit_to_context(
        model.info,
        len(token_ids),
        req.sampling,
        param="messages",
        cap=max_tokens_cap(lease.instance),
    )
    return PreparedPrompt(token_ids, params)


async def _shadow_chat(services: Services, req: ChatRequest, record: VersionRecord) -> None:
    """The same chat completion on a shadow version; the result is discarded."""
    async with services.scheduler.lease(record) as lease:
        _require_task(lease, Task.GENERATE, record.model_id, "/v1/chat/completions")
        await generate(lease.instance, await _prepare_chat(lease, req))


async def _stream_chat(
    request: web.Request,
    req: ChatRequest,
    record: VersionRecord,
    lease: Lease,
    prompt: PreparedPrompt,
    begun: web.StreamResponse | None,
) -> web.StreamResponse:
    completion_id = _response_id("chatcmpl")
    created = int(time.time())
    started = False

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        nonlocal started
        delta: dict[str, str] = {} if finish is not None else {"content": text}
        if not started:
            delta = {"role": "assistant", **delta}
            started = True
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    usage_chunk = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": req.model,
        "choices": [],
    }
    return await _write_sse(
        request,
        req.include_usage,
        record,
        lease,
        [prompt],
        chunk,
        usage_chunk=usage_chunk,
        begun=begun,
    )


# -- streaming -------------------------------------------------------------------

ChunkMaker = Callable[[int, str, str | None], dict[str, Any]]


async def _write_sse(
    request: web.Request,
    include_usage: bool,
    record: VersionRecord,
    lease: Lease,
    prompts: list[PreparedPrompt],
    chunk: ChunkMaker,
    *,
    usage_chunk: dict[str, Any],
    begun: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Server-sent events: a chunk per text piece, a finish chunk per prompt, [DONE].

    An error after the stream began cannot change the status any more; it is sent
    as an ``error`` event in the OpenAI shape, followed by ``[DONE]``. ``begun``: the
    response already sent while waiting for the load (see ``routerd.api.coldstart``).
    """
    response = begun
    if response is None:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                **_served_headers(record, lease),
            }
        )
        await response.prepare(request)
    streaming(response)
    results: list[GenerationResult] = []
    try:
        for index, prompt in enumerate(prompts):
            async with aclosing(stream(lease.instance, prompt)) as pieces:
                async for item in pieces:
                    if isinstance(item, Finished):
                        results.append(item.result)
                        await _send(response, chunk(index, "", _finish(item.result)))
                    elif item:
                        note_first_token()
                        await _send(response, chunk(index, item, None))
        note_usage(*_token_counts(results))
        if include_usage:
            await _send(response, {**usage_chunk, "choices": [], "usage": _usage(results)})
    except (ConnectionResetError, ConnectionError):
        return response  # the client left; leaving the generator cancelled the work
    except Exception as exc:
        mark_stream_failed()
        error = as_routerd_error(exc)
        await _send(response, error_body(error.message, type=error.type, code=error.code))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + _to_json(payload) + b"\n\n")


def _finish(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _token_counts(results: list[GenerationResult]) -> tuple[int, int]:
    prompt = completion = 0
    for result in results:
        prompt += result.prompt_tokens
        completion += result.completion_tokens
    return prompt, completion


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt, completion = _token_counts(results)
    note_usage(prompt, completion)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- embeddings ------------------------------------------------------------------


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    services: Services = request.app[SERVICES]
    req = parse_embedding(await read_json_object(request))
    shadow = functools.partial(_shadow_embeddings, services, req)
    record = route_request(request, req.model, req.user, shadow)
    async with services.scheduler.lease(record, keep_alive=req.keep_alive) as lease:
        _require_task(lease, Task.EMBED, req.model, "/v1/embeddings")
        embedded = await lease.instance.batcher.embed(
            functools.partial(embedding_inputs, req.inputs), estimate_tokens(req.inputs)
        )
    vectors = embedded.vectors
    tokens = sum(len(ids) for ids in embedded.token_ids)
    note_usage(tokens, 0)
    return _answer(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=_served_headers(record, lease),
    )


async def _shadow_embeddings(
    services: Services, req: EmbeddingRequest, record: VersionRecord
) -> None:
    """The same embeddings on a shadow version; the vectors are discarded."""
    async with services.scheduler.lease(record) as lease:
        _require_task(lease, Task.EMBED, record.model_id, "/v1/embeddings")
        await lease.instance.batcher.embed(
            functools.partial(embedding_inputs, req.inputs), estimate_tokens(req.inputs)
        )


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """One embedding as the client asked: JSON numbers, or base64 of little-endian float32.

    JSON has no NaN or infinity; a vector holding one (a model that overflowed) fails
    the request with a backend error rather than reach the client as ``null`` where a
    number belongs. Base64 carries them as the floats they are.
    """
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    # The sum is finite whenever every element is, unless finite ones overflow it.
    if not math.isfinite(sum(vector)) and not all(map(math.isfinite, vector)):
        raise BackendError(
            "the model returned NaN or an infinity in an embedding, which JSON numbers "
            "cannot carry (encoding_format=base64 can)"
        )
    return vector
