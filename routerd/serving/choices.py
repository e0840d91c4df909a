"""A request's choices: ``n`` (or ``best_of``) rows per prompt, generated together.

Every row is an ordinary generation on the leased model, so the rows of one request
share batches with each other and with other requests, and each counts against the
instance's reserved memory like any row (the batcher admits rows while they fit).
Rows run concurrently and the request waits for all of them; if one fails, the others
are stopped before the failure is raised, so no row outlives the lease.

Seeds: row ``i`` of a prompt samples with ``seed + i``, so the ``n`` choices of a
seeded request differ from each other and a repeated request gets the same ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from contract.generation import GenerationResult, Logprob
from routerd.serving.handle import Finished, ModelHandle
from routerd.serving.prompts import PreparedPrompt

_SEEDS = 1 << 64  # seeds wrap within what a generator takes

StreamItem = str | Logprob | Finished
"""What a streamed row yields: text pieces, its tokens' logprobs (each before the text
that token produced), then ``Finished``."""


@dataclass(slots=True)
class Row:
    """One choice to generate: which prompt it answers and how."""

    prompt_index: int
    prompt: PreparedPrompt


def expand(prompts: Sequence[PreparedPrompt], per_prompt: int) -> list[Row]:
    """``per_prompt`` rows for each prompt, in choice order (prompt by prompt)."""
    if per_prompt == 1 and len(prompts) == 1:  # the usual request
        return [Row(0, prompts[0])]
    rows: list[Row] = []
    for index, prompt in enumerate(prompts):
        for i in range(per_prompt):
            rows.append(Row(index, prompt if i == 0 else _sibling(prompt, i)))
    return rows


def _sibling(prompt: PreparedPrompt, offset: int) -> PreparedPrompt:
    """Choice ``offset`` of a prompt: it samples with ``seed + offset``, and leaves the
    prompt's logprobs to the first choice (``generate_rows`` shares them)."""
    params = prompt.params
    if params.seed is None and params.prompt_logprobs is None:
        return prompt
    params = params.copy()
    if params.seed is not None:
        params.seed = (params.seed + offset) % _SEEDS
    params.prompt_logprobs = None
    return PreparedPrompt(prompt.token_ids, params)


async def generate_rows(handle: ModelHandle, rows: Sequence[Row]) -> list[GenerationResult]:
    """Every row's result, in order; the rows run concurrently (one batch, where they fit).

    A prompt's logprobs, computed by its first row alone, are in each of its results.
    """
    if len(rows) == 1:
        row = rows[0]
        return [await handle.generate(row.prompt.token_ids, row.prompt.params)]
    try:
        async with asyncio.TaskGroup() as group:  # a failure stops and awaits the other rows
            tasks = [
                group.create_task(handle.generate(row.prompt.token_ids, row.prompt.params))
                for row in rows
            ]
    except ExceptionGroup as failed:  # the request fails as its first failing row did
        raise failed.exceptions[0] from None
    results: list[GenerationResult] = []
    firsts: dict[int, GenerationResult] = {}
    for row, task in zip(rows, tasks, strict=True):
        result = task.result()
        first = firsts.setdefault(row.prompt_index, result)
        if result.prompt_logprobs is None and first.prompt_logprobs is not None:
            result = dataclasses.replace(result, prompt_logprobs=first.prompt_logprobs)
        results.append(result)
    return results


def best_of(results: Sequence[GenerationResult], n: int) -> list[int]:
    """Where in ``results`` the ``n`` whose generated tokens are the most likely together
    (the highest sum of their log-probabilities) are, most likely first."""
    ranked = sorted(range(len(results)), key=lambda i: cumulative_logprob(results[i]), reverse=True)
    return ranked[:n]


def cumulative_logprob(result: GenerationResult) -> float:
    return sum(entry.logprob for entry in result.logprobs or ())


def usage(rows: Sequence[Row], results: Sequence[GenerationResult]) -> tuple[int, int]:
    """Prompt tokens (each prompt once, however many choices it has) and completion
    tokens (of every row generated, best_of's discarded ones included)."""
    if len(results) == 1:
        return results[0].prompt_tokens, results[0].completion_tokens
    prompts: dict[int, int] = {}
    completion = 0
    for row, result in zip(rows, results, strict=True):
        prompts[row.prompt_index] = result.prompt_tokens
        completion += result.completion_tokens
    return sum(prompts.values()), completion


@dataclass(slots=True)
class _RowDone:
    error: BaseException | None


async def stream_rows(
    handle: ModelHandle, rows: Sequence[Row]
) -> AsyncGenerator[tuple[int, StreamItem], None]:
    """Each row's stream items tagged with the row's index, interleaved as they come.

    Closing this generator early (the client left) stops every row that is still
    running and waits for it; a row's failure stops the others and is raised.
    """
    if len(rows) == 1:
        row = rows[0]
        async with aclosing(handle.stream(row.prompt.token_ids, row.prompt.params)) as items:
            async for item in items:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, StreamItem] | _RowDone] = asyncio.Queue()

    async def pump(index: int, row: Row) -> None:
        try:
            async with aclosing(handle.stream(row.prompt.token_ids, row.prompt.params)) as items:
                async for item in items:
                    queue.put_nowait((index, item))
        except Exception as exc:
            queue.put_nowait(_RowDone(exc))
            return
        queue.put_nowait(_RowDone(None))

    tasks = [asyncio.ensure_future(pump(i, row)) for i, row in enumerate(rows)]
    running = len(tasks)
    try:
        while running:
            entry = await queue.get()
            if isinstance(entry, _RowDone):
                running -= 1
                if entry.error is not None:
                    raise entry.error
                continue
            yield entry
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
