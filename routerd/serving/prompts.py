"""Prompts made ready for a model: tokenized, checked against its vocabulary and
context, with sampling parameters that fit what is left of the context.

Every refusal is a 400 that names the field to fix (``param``); nothing here knows
HTTP, and nothing reaches past the ``ModelHandle``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from contract.generation import GenerationResult, ModelInfo, SamplingParams, Task, asked_fields
from routerd.errors import BadRequest
from routerd.serving.handle import ModelHandle, Tokenizer
from routerd.serving.requests import Prompt, SamplingFields


@dataclass(slots=True)  # not frozen: built per request, where frozen costs 4x
class PreparedPrompt:
    token_ids: list[int]
    params: SamplingParams


_TASK_WORDS = {Task.GENERATE: "generates text", Task.EMBED: "computes embeddings"}

Version = TypeVar("Version", contravariant=True)


class KnowsTasks(Protocol[Version]):
    """Says what a version does without loading it (``Scheduler.task_of``)."""

    async def task_of(self, record: Version) -> Task | None: ...


def require_task(handle: ModelHandle, task: Task, model_id: str, endpoint: str) -> None:
    """400 when the leased model does not do what ``endpoint`` asks of it."""
    has = handle.info.task
    if has is not task:
        raise _wrong_task(has, model_id, endpoint)


async def require_task_before_load(
    tasks: KnowsTasks[Version], record: Version, task: Task, model_id: str, endpoint: str
) -> None:
    """``require_task`` before a lease, so a request a version cannot serve costs no
    load: the same 400 when ``tasks`` knows ``record`` does something else; nothing
    when it does not know (``require_task`` on the lease then decides)."""
    has = await tasks.task_of(record)
    if has is not None and has is not task:
        raise _wrong_task(has, model_id, endpoint)


def _wrong_task(has: Task, model_id: str, endpoint: str) -> BadRequest:
    return BadRequest(
        f"model '{model_id}' {_TASK_WORDS[has]} and cannot serve {endpoint}", param="model"
    )


async def prepare_prompt(
    handle: ModelHandle,
    prompt: Prompt,
    sampling: SamplingFields,
    *,
    param: str,
    truncate: int | None = None,
) -> PreparedPrompt:
    """A completion prompt: text tokenized on the model's thread, token ids checked.

    ``truncate``: vLLM's ``truncate_prompt_tokens``, keep the last that many tokens
    (-1: as many as the context holds with room for one token).
    """
    if isinstance(prompt, str):
        token_ids = await handle.tokenize(prompt)
    else:
        check_token_ids(handle.info, prompt, param=param)
        token_ids = prompt
    token_ids = truncate_prompt(handle.info, token_ids, truncate)
    params = fit_to_context(
        handle.info, len(token_ids), sampling, param=param, cap=handle.max_tokens
    )
    return PreparedPrompt(token_ids, params)


async def prepare_chat(
    handle: ModelHandle,
    messages: Sequence[Mapping[str, Any]],
    sampling: SamplingFields,
    *,
    truncate: int | None = None,
) -> PreparedPrompt:
    """Chat messages rendered with the model's template, fitted to its context."""
    token_ids = truncate_prompt(handle.info, await handle.encode_chat(messages), truncate)
    params = fit_to_context(
        handle.info, len(token_ids), sampling, param="messages", cap=handle.max_tokens
    )
    return PreparedPrompt(token_ids, params)


def truncate_prompt(
    info: ModelInfo, token_ids: list[int], keep: int | None, *, room: int = 1
) -> list[int]:
    """The last ``keep`` tokens (-1: as many as the context holds, less ``room`` left
    to generate in)."""
    if keep is None:
        return token_ids
    if keep < 0:
        keep = max(1, info.context_length - room)
    return token_ids[-keep:] if len(token_ids) > keep else token_ids


def refuse_unsupported(info: ModelInfo, sampling: SamplingFields, model_id: str) -> None:
    """400 naming the first field this model cannot honour that the request sets."""
    if sampling.plain or not info.refuses:
        return
    refused = asked_fields(sampling.params, among=info.refuses)
    if refused:
        raise BadRequest(
            f"model '{model_id}' cannot honour {refused[0]} (its backend does not support it)",
            param=refused[0],
        )


def embedding_inputs(
    inputs: Sequence[Prompt], model: Tokenizer, *, truncate: int | None = None
) -> list[list[int]]:
    """Token ids of an embedding request's inputs, each checked against the context
    (after keeping the last ``truncate`` tokens, vLLM's ``truncate_prompt_tokens``).

    Runs on the model's thread inside the embedding batch (``ModelHandle.embed``), so
    a request costs no thread hop of its own for tokenizing.
    """
    batch: list[list[int]] = []
    for i, item in enumerate(inputs):
        param = "input" if len(inputs) == 1 else f"input[{i}]"
        if isinstance(item, str):
            ids = model.encode_prompt(item)
        else:
            check_token_ids(model.info, item, param=param)
            ids = item
        ids = truncate_prompt(model.info, ids, truncate, room=0)
        if len(ids) > model.info.context_length:
            raise BadRequest(
                f"{param} has {len(ids)} tokens; this model's maximum context length is "
                f"{model.info.context_length} tokens",
                param=param,
                code="context_length_exceeded",
            )
        batch.append(ids)
    return batch


def estimate_tokens(inputs: Sequence[Prompt]) -> int:
    """Tokens of inputs not tokenized yet, for admission: UTF-8 bytes for text (a token
    covers at least one byte in byte-level and byte-fallback vocabularies), exact for ids."""
    return sum(len(item.encode()) if isinstance(item, str) else len(item) for item in inputs)


def check_token_ids(info: ModelInfo, token_ids: Sequence[int], *, param: str) -> None:
    if info.vocab_size and any(t >= info.vocab_size for t in token_ids):
        raise BadRequest(
            f"{param} holds a token id outside the vocabulary (size {info.vocab_size})",
            param=param,
        )


def fit_to_context(
    info: ModelInfo,
    prompt_tokens: int,
    fields: SamplingFields,
    *,
    param: str,
    cap: int | None = None,
) -> SamplingParams:
    """Sampling params whose max_tokens fits the context, or a 400 naming the overflow.

    ``cap``: the model's ``max_tokens`` option; more is refused, and a request that
    names no max_tokens gets at most that many.
    """
    if cap is not None and fields.max_tokens is not None and fields.max_tokens > cap:
        raise BadRequest(
            f"max_tokens is too large: {fields.max_tokens}. This model allows at most {cap} "
            "completion tokens per request.",
            param="max_tokens",
            code="max_tokens_exceeded",
        )
    room = info.context_length - prompt_tokens
    echo_only = fields.max_tokens == 0 and room >= 0  # the prompt alone, nothing generated
    if not echo_only and (room < 1 or (fields.max_tokens is not None and fields.max_tokens > room)):
        asked = fields.max_tokens if fields.max_tokens is not None else 1
        raise BadRequest(
            f"This model's maximum context length is {info.context_length} tokens. However, "
            f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, "
            f"{asked} for the completion). Please reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = fields.max_tokens if fields.max_tokens is not None else room
    params = fields.params.copy()
    params.max_tokens = max_tokens if cap is None else min(max_tokens, cap)
    _check_sampling_ids(info, params)
    return params


def _check_sampling_ids(info: ModelInfo, params: SamplingParams) -> None:
    """Token ids in sampling fields must be in the vocabulary, like a prompt's."""
    if params.logit_bias:
        check_token_ids(info, list(params.logit_bias), param="logit_bias")
    if params.allowed_token_ids is not None:
        check_token_ids(info, params.allowed_token_ids, param="allowed_token_ids")
    if params.stop_token_ids:
        check_token_ids(info, params.stop_token_ids, param="stop_token_ids")


def finish_reason(result: GenerationResult) -> str:
    """The OpenAI finish reason: ``length`` when max_tokens ran out, else ``stop``."""
    return "length" if result.finish_reason == "length" else "stop"


def token_counts(results: Sequence[GenerationResult]) -> tuple[int, int]:
    """Prompt and completion tokens of all of a request's results together."""
    prompt = completion = 0
    for result in results:
        prompt += result.prompt_tokens
        completion += result.completion_tokens
    return prompt, completion
