"""A leased instance as serving sees it: ``InstanceHandle`` implements ``ModelHandle``.

The blocking work runs on the instance's own thread (DESIGN.md rule 6), through its
batcher. Streaming crosses from that thread to the loop through a queue fed with
``call_soon_threadsafe``; if the consumer stops early (client gone) the generation
is cancelled and awaited, so the lease is never released while the thread still
uses the model. A forced eviction's reason replaces a cut-short answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from contract.generation import (
    Cancellation,
    Generation,
    GenerationResult,
    Logprob,
    ModelInfo,
    SamplingParams,
)
from routerd.errors import Unavailable
from routerd.serving.handle import Embedding, Finished, PrepareInputs
from routerd.version_options import options_of

if TYPE_CHECKING:
    from routerd.instance import Instance


class InstanceHandle:
    """One instance's ``ModelHandle``; made once per instance, shared by its leases."""

    __slots__ = ("_instance",)

    def __init__(self, instance: Instance) -> None:
        self._instance = instance

    @property
    def info(self) -> ModelInfo:
        return self._instance.model.info

    @property
    def device(self) -> str:
        return self._instance.device

    @property
    def max_tokens(self) -> int | None:
        """The version's ``max_tokens`` option (checked at registration), if set."""
        return options_of(self._instance.record).max_tokens

    async def tokenize(self, text: str) -> list[int]:
        """On the instance thread, not any pool thread: a fast tokenizer is not safe to
        use from two threads at once, and the instance thread also decodes."""
        instance = self._instance
        return await instance.call(instance.model.encode_prompt, text)

    async def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        instance = self._instance
        return await instance.call(instance.model.encode_chat, messages)

    async def decode_tokens(self, token_ids: Sequence[int]) -> str:
        instance = self._instance
        return await instance.call(instance.model.decode_tokens, token_ids)

    async def embed(self, prepare: PrepareInputs, tokens: int) -> Embedding:
        return await self._instance.batcher.embed(prepare, tokens)

    async def generate(self, token_ids: list[int], params: SamplingParams) -> GenerationResult:
        instance = self._instance
        generation = Generation(token_ids, params)
        result = instance.batcher.generate_now(generation)
        if result is not None:  # ran inline: nothing was left running that could need stopping
            self._check_not_revoked()
            return result
        cancellation = generation.cancellation
        instance.track(cancellation)
        work = asyncio.ensure_future(instance.batcher.generate(generation))
        try:
            # shield: the request being cancelled (deadline, shutdown) must not abandon
            # the row on the model's thread; it is told to stop and awaited below instead.
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            await self._stop(work, cancellation)
            raise
        finally:
            instance.untrack(cancellation)
        self._check_not_revoked()
        return result

    async def stream(
        self, token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[str | Logprob | Finished, None]:
        instance = self._instance
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | Logprob | None] = asyncio.Queue()
        cancellation = Cancellation()

        def on_text(piece: str | Logprob) -> None:  # called on the instance thread
            loop.call_soon_threadsafe(pieces.put_nowait, piece)

        on_logprob = on_text if params.logprobs is not None else None
        instance.track(cancellation)
        work = asyncio.ensure_future(
            instance.batcher.generate(
                Generation(token_ids, params, on_text, cancellation, on_logprob)
            )
        )
        work.add_done_callback(lambda _: instance.untrack(cancellation))
        # Queued after every piece: the thread's call_soon_threadsafe calls precede the
        # future's completion callback, and the loop runs callbacks in order.
        work.add_done_callback(lambda _: pieces.put_nowait(None))
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            result = work.result()
            self._check_not_revoked()
            yield Finished(result)
        finally:
            if not work.done():
                await self._stop(work, cancellation)

    def _check_not_revoked(self) -> None:
        """A forced eviction stopped this request's work: say so instead of a short answer."""
        if self._instance.revoked is not None:
            raise Unavailable(self._instance.revoked, code="evicted", retry_after=1)

    async def _stop(
        self, work: asyncio.Future[GenerationResult], cancellation: Cancellation
    ) -> None:
        """Tell a row to stop and wait for it, so the lease outlives the thread's use of it.

        A row that does not stop within the instance's ``stop_timeout`` means its thread
        is stuck in the model: the instance is reported hung (the scheduler retires it)
        and the wait ends, so the caller is answered and its lease released anyway.
        """
        cancellation.cancel()
        if work.done():
            return
        instance = self._instance
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
