"""Running generation and embedding on a leased instance, from the event loop.

The blocking work runs on the instance's own thread (DESIGN.md rule 6). Streaming
crosses from that thread to the loop through a queue fed with
``call_soon_threadsafe``; if the consumer stops early (client gone) the generation
is cancelled and awaited, so the lease is never released while the thread still
uses the model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from backends.base import (
    Cancellation,
    GenerationResult,
    LoadedModel,
    ModelInfo,
    SamplingParams,
)
from routerd.api.schemas import Prompt, SamplingFields
from routerd.errors import BadRequest, Unavailable
from routerd.instance import Instance


@dataclass(slots=True)  # not frozen: built per request, where frozen costs 4x
class PreparedPrompt:
    token_ids: list[int]
    params: SamplingParams


async def tokenize(instance: Instance, prompt: Prompt, *, param: str) -> list[int]:
    """Token ids for a prompt; strings are tokenized on the instance thread, arrays checked.

    The instance thread, not any pool thread: a fast tokenizer is not safe to use from
    two threads at once, and the instance thread also decodes during generation.
    """
    if isinstance(prompt, str):
        return await instance.call(instance.model.encode_prompt, prompt)
    check_token_ids(instance.model.info, prompt, param=param)
    return prompt


def embedding_inputs(inputs: Sequence[Prompt], model: LoadedModel) -> list[list[int]]:
    """Token ids of an embedding request's inputs, each checked against the context.

    Runs on the instance thread inside the embedding batch (``Batcher.embed``), so a
    request costs no thread hop of its own for tokenizing.
    """
    batch: list[list[int]] = []
    for i, item in enumerate(inputs):
        param = "input" if len(inputs) == 1 else f"input[{i}]"
        if isinstance(item, str):
            ids = model.encode_prompt(item)
        else:
            check_token_ids(model.info, item, param=param)
            ids = item
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
    if room < 1 or (fields.max_tokens is not None and fields.max_tokens > room):
        asked = fields.max_tokens if fields.max_tokens is not None else 1
        raise BadRequest(
            f"This model's maximum context length is {info.context_length} tokens. However, "
            f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, "
            f"{asked} for the completion). Please reduce the prompt or max_tokens.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = fields.max_tokens if fields.max_tokens is not None else room
    return SamplingParams(
        max_tokens=max_tokens if cap is None else min(max_tokens, cap),
        temperature=fields.temperature,
        top_p=fields.top_p,
        seed=fields.seed,
        stop=fields.stop,
    )


def max_tokens_cap(instance: Instance) -> int | None:
    """The version's ``max_tokens`` option (checked at registration), if set."""
    cap = instance.record.options.get("max_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) else None


def check_not_revoked(instance: Instance) -> None:
    """A forced eviction stopped this request's work: say so instead of a short answer."""
    if instance.revoked is not None:
        raise Unavailable(instance.revoked, code="evicted", retry_after=1)


async def generate(instance: Instance, prompt: PreparedPrompt) -> GenerationResult:
    cancellation = Cancellation()
    result = instance.batcher.generate_now(prompt.token_ids, prompt.params, None, cancellation)
    if result is not None:  # ran inline: nothing was left running that could need stopping
        check_not_revoked(instance)
        return result
    instance.track(cancellation)
    work = asyncio.ensure_future(
        instance.batcher.generate(prompt.token_ids, prompt.params, None, cancellation)
    )
    try:
        # shield: the request being cancelled (deadline, shutdown) must not abandon the
        # row on the model's thread; it is told to stop and awaited below instead.
        result = await asyncio.shield(work)
    except asyncio.CancelledError:
        await stop_work(instance, work, cancellation)
        raise
    finally:
        instance.untrack(cancellation)
    check_not_revoked(instance)
    return result


async def stop_work(
    instance: Instance, work: asyncio.Future[GenerationResult], cancellation: Cancellation
) -> None:
    """Tell a row to stop and wait for it, so the lease outlives the thread's use of it.

    A row that does not stop within the instance's ``stop_timeout`` means its thread is
    stuck in the model: the instance is reported hung (the scheduler retires it) and
    the wait ends, so the caller is answered and its lease released anyway.
    """
    cancellation.cancel()
    if work.done():
        return
    done, _ = await asyncio.wait([work], timeout=instance.stop_timeout)
    if not done:
        instance.report_failure(
            f"generation did not stop within {instance.stop_timeout:g}s of being cancelled",
            fatal=True,
        )
        work.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[GenerationResult]) -> None:
    """Read an abandoned row's outcome so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class Finished:
    """The last item of a stream: the whole result with its usage and finish reason."""

    result: GenerationResult


async def stream(
    instance: Instance, prompt: PreparedPrompt
) -> AsyncGenerator[str | Finished, None]:
    """Yield text pieces as the model produces them, then ``Finished``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    cancellation = Cancellation()

    def on_text(piece: str) -> None:  # called on the instance thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    instance.track(cancellation)
    work = asyncio.ensure_future(
        instance.batcher.generate(prompt.token_ids, prompt.params, on_text, cancellation)
    )
    work.add_done_callback(lambda _: instance.untrack(cancellation))
    # Queued after every piece: the thread's call_soon_threadsafe calls precede the
    # future's completion callback, and the loop runs callbacks in order.
    work.add_done_callback(lambda _: pieces.put_nowait(None))
    try:
        while (piece := await pieces.get()) is not None:
            yield piece
        result = work.result()
        check_not_revoked(instance)
        yield Finished(result)
    finally:
        if not work.done():
            await stop_work(instance, work, cancellation)
