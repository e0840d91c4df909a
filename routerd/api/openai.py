"""The OpenAI-compatible API: models, completions, chat completions, embeddings.

Each handler follows the request path of DESIGN.md: parse and validate the body,
route the model id to a version (``routerd.api.traffic``: weighted sticky split,
shadow copy), hold a scheduler lease for the whole response (streaming included),
run the work on the instance's thread.
"""

from __future__ import annotations

import base64
import functools
import logging
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
from contract.generation import GenerationResult, Logprob, Task
from routerd.api.answers import answer, end_stream, fail_stream, open_stream, send_event
from routerd.api.choices import (
    Asked,
    Echo,
    StreamedMessage,
    StreamedText,
    first_prompt_entry,
    message_choice,
    text_choice,
    vllm_prompt_logprobs,
)
from routerd.api.coldstart import ColdStream, client_gone
from routerd.api.errors import read_json_object
from routerd.api.keys import LIVE, ROUTER, SCHEDULER
from routerd.api.limits import claim_stream, streaming
from routerd.api.schemas import parse_chat, parse_completion, parse_embedding
from routerd.api.traffic import mark_stream_failed, route_request
from routerd.errors import BadRequest, ModelNotFound
from routerd.metrics import note_cold_start, note_first_token, note_usage
from routerd.request_log import note_client_gone
from routerd.scheduler import Lease, Scheduler
from routerd.serving.choices import Row, best_of, expand, generate_rows, stream_rows
from routerd.serving.choices import usage as choices_usage
from routerd.serving.handle import Finished, ModelHandle
from routerd.serving.prompts import (
    PreparedPrompt,
    embedding_inputs,
    estimate_tokens,
    finish_reason,
    prepare_chat,
    prepare_prompt,
    refuse_unsupported,
    require_task,
    require_task_before_load,
)
from routerd.serving.requests import (
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    SamplingFields,
)
from state import VersionRecord

log = logging.getLogger("routerd.api")

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
StreamedChoice = StreamedText | StreamedMessage


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What tells /v1/completions and /v1/chat/completions apart in their answers; the
    rest of their path (routing, lease, generation, streaming) is one."""

    endpoint: str
    id_prefix: str  # of the response id
    body_object: str  # ``object`` of a whole answer
    chunk_object: str  # ``object`` of a streamed chunk
    choice: Callable[[Asked, int, GenerationResult, Echo | None], dict[str, Any]]
    streamed: Callable[[Asked, int], StreamedChoice]  # a fresh one per streamed choice


_COMPLETIONS: Final = _Dialect(
    endpoint="/v1/completions",
    id_prefix="cmpl",
    body_object="text_completion",
    chunk_object="text_completion",
    choice=text_choice,
    streamed=StreamedText,
)
_CHAT: Final = _Dialect(
    endpoint="/v1/chat/completions",
    id_prefix="chatcmpl",
    body_object="chat.completion",
    chunk_object="chat.completion.chunk",
    choice=message_choice,
    streamed=StreamedMessage,
)


def _max_stop(request: web.Request) -> int:
    return request.app[LIVE].config.server.max_stop_sequences


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    req = parse_completion(await read_json_object(request), max_stop=_max_stop(request))

    async def prepare(handle: ModelHandle) -> list[PreparedPrompt]:
        truncate = req.truncate_prompt_tokens
        return [
            await prepare_prompt(handle, p, req.sampling, param="prompt", truncate=truncate)
            for p in req.prompts
        ]

    return await _serve_generation(request, req, _COMPLETIONS, prepare, echo=req.echo)


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = parse_chat(await read_json_object(request), max_stop=_max_stop(request))

    async def prepare(handle: ModelHandle) -> list[PreparedPrompt]:
        return [
            await prepare_chat(
                handle, req.messages, req.sampling, truncate=req.truncate_prompt_tokens
            )
        ]

    return await _serve_generation(request, req, _CHAT, prepare)


def _ignored_fields(req: GenerationRequest | EmbeddingRequest, headers: dict[str, str]) -> None:
    """Name the fields outside OpenAI's and vLLM's schemas that the request carried: in a
    warning, and in ``x-routerd-ignored-fields`` for the client."""
    if req.ignored:
        # Escaped as Python writes them: a header may carry neither non-ASCII nor control
        # characters, and a log line must not be split by one.
        names = ", ".join(
            name[:64].encode("unicode_escape").decode("ascii") for name in req.ignored[:32]
        )
        log.warning("ignored request fields outside the OpenAI and vLLM schemas: %s", names)
        headers["x-routerd-ignored-fields"] = names


def _asked(req: GenerationRequest) -> Asked:
    return Asked(req.logprobs, req.prompt_logprobs, req.tokens_as_ids)


async def _serve_generation(
    request: web.Request,
    req: GenerationRequest,
    dialect: _Dialect,
    prepare: Prepare,
    *,
    echo: bool = False,
) -> web.StreamResponse:
    """A generating request's path: route it (with its shadow copy), lease the
    version, prepare its prompts, run their choices together, answer as JSON or as a
    stream."""
    scheduler = request.app[SCHEDULER]
    if req.stream:
        claim_stream()
        if req.prompt_logprobs is not None:  # as vLLM: they are not streamed
            raise BadRequest("prompt_logprobs cannot be streamed", param="prompt_logprobs")
    per_prompt = getattr(req, "best_of", None) or req.n
    shadow = functools.partial(
        _shadow_generation, scheduler, dialect.endpoint, prepare, req.sampling, per_prompt
    )
    record = route_request(request, req.model, req.user, shadow)
    await require_task_before_load(scheduler, record, Task.GENERATE, req.model, dialect.endpoint)
    cold = _cold_stream(request, record, stream=req.stream)
    try:
        async with cold.lease(scheduler, keep_alive=req.keep_alive) as lease:
            handle = lease.handle
            require_task(handle, Task.GENERATE, req.model, dialect.endpoint)
            refuse_unsupported(handle.info, req.sampling, req.model)
            prompts = await prepare(handle)
            if req.stream:
                return await _stream_generation(
                    dialect, req, request, record, lease, prompts, per_prompt, cold.response, echo
                )
            rows = expand(prompts, per_prompt)
            results = await generate_rows(handle, rows)
            echoes = await _echoes(handle, req, prompts, results[::per_prompt]) if echo else None
    except Exception as exc:
        if cold.response is None:
            raise
        mark_stream_failed()
        return await cold.fail(exc)
    prompt_tokens, completion_tokens = choices_usage(rows, results)
    picked = _pick(rows, results, req.n)
    asked = _asked(req)
    body = {
        "id": _response_id(dialect.id_prefix),
        "object": dialect.body_object,
        "created": int(time.time()),
        "model": req.model,
        "choices": [
            dialect.choice(asked, i, results[r], echoes[rows[r].prompt_index] if echoes else None)
            for i, r in enumerate(picked)
        ],
        "usage": _usage(prompt_tokens, completion_tokens),
    }
    if req.prompt_logprobs is not None and dialect is _CHAT:  # vLLM: chat's is top-level
        body["prompt_logprobs"] = vllm_prompt_logprobs(
            results[0].prompt_logprobs, req.prompt_logprobs, req.tokens_as_ids
        )
    headers = _served_headers(record, lease)
    _ignored_fields(req, headers)
    return answer(body, headers=headers)


def _pick(rows: list[Row], results: list[GenerationResult], n: int) -> list[int]:
    """Which rows become choices, in order: all of them, or each prompt's best ``n``
    when ``best_of`` made more."""
    per_prompt = len(rows) // (rows[-1].prompt_index + 1)
    if per_prompt == n:
        return list(range(len(rows)))
    picked: list[int] = []
    for start in range(0, len(rows), per_prompt):
        picked += [start + i for i in best_of(results[start : start + per_prompt], n)]
    return picked


async def _echoes(
    handle: ModelHandle,
    req: GenerationRequest,
    prompts: list[PreparedPrompt],
    results: list[GenerationResult] | None,
) -> list[Echo]:
    """What ``echo`` puts before each prompt's completions: its text and, with logprobs,
    its tokens' entries — from the prompt's result, or (``results`` None: a stream, which
    sends the prompt first) from a run of the prompt alone."""
    assert isinstance(req, CompletionRequest)
    echoes: list[Echo] = []
    for index, prompt in enumerate(prompts):
        asked = req.prompts[index]
        echo = Echo(asked if isinstance(asked, str) else await handle.decode_tokens(asked))
        if req.logprobs is not None:
            ids = prompt.token_ids
            if results is not None:
                entries = results[index].prompt_logprobs or []
            else:
                alone = prompt.params.copy()
                alone.max_tokens, alone.logprobs = 0, None
                entries = (await handle.generate(ids, alone)).prompt_logprobs or []
            first = first_prompt_entry(ids[0], await handle.decode_tokens(ids[:1]))
            echo.entries = [first, *(e for e in entries[1:] if e is not None)]
        echoes.append(echo)
    return echoes


async def _shadow_generation(
    scheduler: Scheduler,
    endpoint: str,
    prepare: Prepare,
    sampling: SamplingFields,
    per_prompt: int,
    record: VersionRecord,
) -> None:
    """The same request on a shadow version; the results are discarded."""
    await require_task_before_load(scheduler, record, Task.GENERATE, record.model_id, endpoint)
    async with scheduler.lease(record) as lease:
        require_task(lease.handle, Task.GENERATE, record.model_id, endpoint)
        refuse_unsupported(lease.handle.info, sampling, record.model_id)
        await generate_rows(lease.handle, expand(await prepare(lease.handle), per_prompt))


def _cold_stream(request: web.Request, record: VersionRecord, *, stream: bool) -> ColdStream:
    heartbeat = request.app[LIVE].config.server.stream_heartbeat
    return ColdStream(request, record, stream=stream, heartbeat=heartbeat)


# -- streaming -------------------------------------------------------------------


async def _stream_generation(
    dialect: _Dialect,
    req: GenerationRequest,
    request: web.Request,
    record: VersionRecord,
    lease: Lease,
    prompts: list[PreparedPrompt],
    per_prompt: int,
    begun: web.StreamResponse | None,
    echo: bool,
) -> web.StreamResponse:
    """Server-sent events: a chunk per text piece of any choice (choices interleave as
    they come), a finish chunk per choice, the usage if asked, ``[DONE]``.

    An error after the stream began is an ``error`` event, then ``[DONE]``
    (``routerd.api.answers``). ``begun``: the response already sent while waiting for
    the load (see ``routerd.api.coldstart``).
    """
    envelope = {
        "id": _response_id(dialect.id_prefix),
        "object": dialect.chunk_object,
        "created": int(time.time()),
        "model": req.model,
    }
    asked = _asked(req)
    response = begun
    if response is None:
        headers = _served_headers(record, lease)
        _ignored_fields(req, headers)
        response = await open_stream(request, headers)
    streaming(response)
    handle = lease.handle
    try:
        echoes: list[Echo] = []
        if echo:
            echoes = await _echoes(handle, req, prompts, None)
            for prompt in prompts:
                prompt.params.prompt_logprobs = None  # its echo carries them
        rows = expand(prompts, per_prompt)
        choices = [dialect.streamed(asked, i) for i in range(len(rows))]
        results: list[GenerationResult | None] = [None] * len(rows)
        pending: list[list[Logprob]] = [[] for _ in rows]
        for i, row in enumerate(rows if echoes else ()):
            first = echoes[row.prompt_index]
            chunk = choices[i].piece(first.text, first.entries, None)
            await send_event(response, {**envelope, "choices": [chunk]})
        async with aclosing(stream_rows(handle, rows)) as items:
            async for i, item in items:
                if isinstance(item, Logprob):
                    pending[i].append(item)
                    continue
                if isinstance(item, Finished):
                    results[i] = item.result
                    chunk = choices[i].piece("", pending[i], finish_reason(item.result))
                elif item:
                    note_first_token()
                    chunk = choices[i].piece(item, pending[i], None)
                else:
                    continue
                pending[i] = []
                await send_event(response, {**envelope, "choices": [chunk]})
        done = [r for r in results if r is not None]
        usage = _usage(*choices_usage(rows, done))
        if req.include_usage:
            await send_event(response, {**envelope, "choices": [], "usage": usage})
    except (ConnectionResetError, ConnectionError):
        note_client_gone()
        return response  # the client left; leaving the generator cancelled the work
    except Exception as exc:
        mark_stream_failed()
        return await fail_stream(response, exc)
    await end_stream(response)
    return response


def _usage(prompt: int, completion: int) -> dict[str, int]:
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
    await require_task_before_load(scheduler, record, Task.EMBED, req.model, "/v1/embeddings")
    gone = client_gone(request)
    async with scheduler.lease(record, keep_alive=req.keep_alive, client_gone=gone) as lease:
        require_task(lease.handle, Task.EMBED, req.model, "/v1/embeddings")
        embedded = await lease.handle.embed(
            functools.partial(embedding_inputs, req.inputs, truncate=req.truncate_prompt_tokens),
            estimate_tokens(req.inputs),
        )
    vectors = embedded.vectors
    tokens = sum(len(ids) for ids in embedded.token_ids)
    note_usage(tokens, 0)
    headers = _served_headers(record, lease)
    _ignored_fields(req, headers)
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
        headers=headers,
    )


async def _shadow_embeddings(
    scheduler: Scheduler, req: EmbeddingRequest, record: VersionRecord
) -> None:
    """The same embeddings on a shadow version; the vectors are discarded."""
    await require_task_before_load(scheduler, record, Task.EMBED, record.model_id, "/v1/embeddings")
    async with scheduler.lease(record) as lease:
        require_task(lease.handle, Task.EMBED, record.model_id, "/v1/embeddings")
        await lease.handle.embed(
            functools.partial(embedding_inputs, req.inputs, truncate=req.truncate_prompt_tokens),
            estimate_tokens(req.inputs),
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
