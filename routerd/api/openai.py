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
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from contract.errors import BackendError
from contract.generation import GenerationResult, Task
from routerd.api.answers import answer, end_stream, fail_stream, open_stream, send_event
from routerd.api.coldstart import ColdStream, client_gone
from routerd.api.errors import read_json_object
from routerd.api.keys import LIVE, ROUTER, SCHEDULER
from routerd.api.limits import claim_stream, streaming
from routerd.api.schemas import parse_chat, parse_completion, parse_embedding
from routerd.api.traffic import mark_stream_failed, route_request
from routerd.errors import ModelNotFound
from routerd.metrics import note_cold_start, note_first_token, note_usage
from routerd.request_log import note_client_gone
from routerd.scheduler import Lease, Scheduler
from routerd.serving.handle import Finished, ModelHandle
from routerd.serving.prompts import (
    PreparedPrompt,
    embedding_inputs,
    estimate_tokens,
    finish_reason,
    generate,
    prepare_chat,
    prepare_prompt,
    require_task,
    token_counts,
)
from routerd.serving.requests import (
    EmbeddingRequest,
    GenerationRequest,
)
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
        "x-routerd-device": lease.handle.device,
    }
    if lease.cold_start_ms is not None:
        headers["x-routerd-cold-start-ms"] = f"{lease.cold_start_ms:.0f}"
        note_cold_start(lease.cold_start_ms)
    return headers


# -- models ----------------------------------------------------------------------


def _model_entry(
    model_id: str, record: VersionRecord, versions: list[str] | None = None
) -> dict[str, Any]:
    """One model as OpenAI lists it; ``root`` is the version the id serves now, and
    ``versions`` (an extension) every version of the name, each servable by its id."""
    entry: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": int(record.created_at),
        "owned_by": "routerd",
        "root": record.model_id,
    }
    if versions is not None:
        entry["versions"] = versions
    return entry


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Each servable name once: clients (and their model pickers) show this list, and
    one entry per version doubled it. ``name@version`` stays servable."""
    table = request.app[ROUTER].table
    versions: dict[str, list[str]] = {}
    for model_id, record in sorted(
        table.versions.items(), key=lambda kv: (kv[1].created_at, kv[0])
    ):
        versions.setdefault(record.name, []).append(model_id)
    data = [
        _model_entry(name, record, versions.get(name, [record.model_id]))
        for name, record in sorted(table.latest.items())
    ]
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{model_id}")
async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model_id"]
    try:
        record = request.app[ROUTER].resolve(model_id)
    except ModelNotFound:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model") from None
    return web.json_response(_model_entry(model_id, record))


# -- completions and chat ----------------------------------------------------------


Prepare = Callable[[ModelHandle], Awaitable[list[PreparedPrompt]]]
"""Makes a request's prompts ready on the leased model (serving does the work)."""
ChoiceMaker = Callable[[int, str, str | None], dict[str, Any]]
"""One streamed choice: the prompt's index, a text piece, the finish reason (or None)."""


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What tells /v1/completions and /v1/chat/completions apart in their answers; the
    rest of their path (routing, lease, generation, streaming) is one."""

    endpoint: str
    id_prefix: str  # of the response id
    body_object: str  # ``object`` of a whole answer
    chunk_object: str  # ``object`` of a streamed chunk
    choice: Callable[[int, GenerationResult], dict[str, Any]]  # one of a whole answer
    stream_choices: Callable[[], ChoiceMaker]  # a fresh maker per stream


def _text_choice(index: int, result: GenerationResult) -> dict[str, Any]:
    return {
        "index": index,
        "text": result.text,
        "logprobs": None,
        "finish_reason": finish_reason(result),
    }


def _text_piece(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _message_choice(index: int, result: GenerationResult) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": None,
        "finish_reason": finish_reason(result),
    }


def _delta_pieces() -> ChoiceMaker:
    """Chat's streamed choices: the first delta names the role, a finishing one is empty."""
    started = False

    def piece(index: int, text: str, finish: str | None) -> dict[str, Any]:
        nonlocal started
        delta: dict[str, str] = {} if finish is not None else {"content": text}
        if not started:
            delta = {"role": "assistant", **delta}
            started = True
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    return piece


_COMPLETIONS: Final = _Dialect(
    endpoint="/v1/completions",
    id_prefix="cmpl",
    body_object="text_completion",
    chunk_object="text_completion",
    choice=_text_choice,
    stream_choices=lambda: _text_piece,
)
_CHAT: Final = _Dialect(
    endpoint="/v1/chat/completions",
    id_prefix="chatcmpl",
    body_object="chat.completion",
    chunk_object="chat.completion.chunk",
    choice=_message_choice,
    stream_choices=_delta_pieces,
)


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await read_json_object(request))

    async def prepare(handle: ModelHandle) -> list[PreparedPrompt]:
        return [await prepare_prompt(handle, p, req.sampling, param="prompt") for p in req.prompts]

    return await _serve_generation(request, req, _COMPLETIONS, prepare)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(await read_json_object(request))

    async def prepare(handle: ModelHandle) -> list[PreparedPrompt]:
        return [await prepare_chat(handle, req.messages, req.sampling)]

    return await _serve_generation(request, req, _CHAT, prepare)


async def _serve_generation(
    request: web.Request, req: GenerationRequest, dialect: _Dialect, prepare: Prepare
) -> web.StreamResponse:
    """A generating request's path: route it (with its shadow copy), lease the
    version, prepare and run its prompts, answer as JSON or as a stream."""
    scheduler = request.app[SCHEDULER]
    if req.stream:
        claim_stream()
    shadow = functools.partial(_shadow_generation, scheduler, dialect.endpoint, prepare)
    record = route_request(request, req.model, req.user, shadow)
    cold = _cold_stream(request, record, stream=req.stream)
    try:
        async with cold.lease(scheduler, keep_alive=req.keep_alive) as lease:
            require_task(lease.handle, Task.GENERATE, req.model, dialect.endpoint)
            prompts = await prepare(lease.handle)
            if req.stream:
                return await _stream_generation(
                    dialect, req, request, record, lease, prompts, cold.response
                )
            results = [await generate(lease.handle, p) for p in prompts]
    except Exception as exc:
        if cold.response is None:
            raise
        mark_stream_failed()
        return await cold.fail(exc)
    body = {
        "id": _response_id(dialect.id_prefix),
        "object": dialect.body_object,
        "created": int(time.time()),
        "model": req.model,
        "choices": [dialect.choice(i, r) for i, r in enumerate(results)],
        "usage": _usage(results),
    }
    return answer(body, headers=_served_headers(record, lease))


async def _shadow_generation(
    scheduler: Scheduler, endpoint: str, prepare: Prepare, record: VersionRecord
) -> None:
    """The same request on a shadow version; the results are discarded."""
    async with scheduler.lease(record) as lease:
        require_task(lease.handle, Task.GENERATE, record.model_id, endpoint)
        for prompt in await prepare(lease.handle):
            await generate(lease.handle, prompt)


def _cold_stream(request: web.Request, record: VersionRecord, *, stream: bool) -> ColdStream:
    heartbeat = request.app[LIVE].config.server.stream_heartbeat
    return ColdStream(request, record, stream=stream, heartbeat=heartbeat)


async def _stream_generation(
    dialect: _Dialect,
    req: GenerationRequest,
    request: web.Request,
    record: VersionRecord,
    lease: Lease,
    prompts: list[PreparedPrompt],
    begun: web.StreamResponse | None,
) -> web.StreamResponse:
    envelope = {
        "id": _response_id(dialect.id_prefix),
        "object": dialect.chunk_object,
        "created": int(time.time()),
        "model": req.model,
    }
    choice = dialect.stream_choices()

    def chunk(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {**envelope, "choices": [choice(index, text, finish)]}

    return await _write_sse(
        request,
        req.include_usage,
        record,
        lease,
        prompts,
        chunk,
        usage_chunk=envelope,
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

    An error after the stream began is an ``error`` event, then ``[DONE]``
    (``routerd.api.answers``). ``begun``: the response already sent while waiting for
    the load (see ``routerd.api.coldstart``).
    """
    response = begun
    if response is None:
        response = await open_stream(request, _served_headers(record, lease))
    streaming(response)
    results: list[GenerationResult] = []
    try:
        for index, prompt in enumerate(prompts):
            await _stream_one(response, lease.handle, prompt, index, chunk, results)
        note_usage(*token_counts(results))
        if include_usage:
            await send_event(response, {**usage_chunk, "choices": [], "usage": _usage(results)})
    except (ConnectionResetError, ConnectionError):
        note_client_gone()
        return response  # the client left; leaving the generator cancelled the work
    except Exception as exc:
        mark_stream_failed()
        return await fail_stream(response, exc)
    await end_stream(response)
    return response


async def _stream_one(
    response: web.StreamResponse,
    handle: ModelHandle,
    prompt: PreparedPrompt,
    index: int,
    chunk: ChunkMaker,
    results: list[GenerationResult],
) -> None:
    """One prompt's pieces as chunks, then its finish chunk; its result joins ``results``."""
    async with aclosing(handle.stream(prompt.token_ids, prompt.params)) as pieces:
        async for item in pieces:
            if isinstance(item, Finished):
                results.append(item.result)
                await send_event(response, chunk(index, "", finish_reason(item.result)))
            elif item:
                note_first_token()
                await send_event(response, chunk(index, item, None))


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt, completion = token_counts(results)
    note_usage(prompt, completion)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# -- embeddings ------------------------------------------------------------------


@routes.post("/v1/embeddings")
async def embeddings(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    req = parse_embedding(await read_json_object(request))
    shadow = functools.partial(_shadow_embeddings, scheduler, req)
    record = route_request(request, req.model, req.user, shadow)
    gone = client_gone(request)
    async with scheduler.lease(record, keep_alive=req.keep_alive, client_gone=gone) as lease:
        require_task(lease.handle, Task.EMBED, req.model, "/v1/embeddings")
        embedded = await lease.handle.embed(
            functools.partial(embedding_inputs, req.inputs), estimate_tokens(req.inputs)
        )
    vectors = embedded.vectors
    tokens = sum(len(ids) for ids in embedded.token_ids)
    note_usage(tokens, 0)
    return answer(
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
    scheduler: Scheduler, req: EmbeddingRequest, record: VersionRecord
) -> None:
    """The same embeddings on a shadow version; the vectors are discarded."""
    async with scheduler.lease(record) as lease:
        require_task(lease.handle, Task.EMBED, record.model_id, "/v1/embeddings")
        await lease.handle.embed(
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
