"""One queue per instance, served by one loop that forms batches (the queue as an actor).

Requests (which already hold a lease) put their work in the instance's queue and
await the result. A single task per instance asks the batching policy what to start
and runs it on the instance's thread: generation rows through the backend's
``generate_batch`` — which asks the queue again at every decode step, so requests
arriving mid-batch join the running batch — and embedding requests merged into one
forward pass. Policies stay pure; the queue is the only shared state and is guarded
by a lock because the instance thread reads it between decode steps.

Models that batch continuously themselves (vLLM; ``backends.base.AsyncGenerating``)
skip the queue: each request goes straight to their ``generate_async`` on the loop.
Likewise an embedding request to a model whose engine pools in batches of its own
(``backends.base.AsyncEmbedding``) is tokenized on the instance thread and handed to
its ``embed_async``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from backends.base import AsyncEmbedding, AsyncGenerating, GenerationRow, LoadedModel
from contract.errors import InvalidRequest, ModelCrashed
from contract.generation import Generation, GenerationResult, Task
from policies.batching import BatchingPolicy, Queued
from routerd.errors import RouterdError, Unavailable
from routerd.instance import Instance
from routerd.serving.handle import Embedding

log = logging.getLogger("routerd.batcher")


PrepareInputs = Callable[[LoadedModel], list[list[int]]]
"""Turns one embedding request's inputs into checked token ids; runs on the instance
thread as part of the batch (so tokenizing costs no thread hop of its own) and raises
to fail that request alone."""


@dataclass(eq=False)
class _EmbedJob:
    prepare: PrepareInputs
    future: asyncio.Future[Embedding]
    tokens: int


@dataclass(eq=False)
class _Entry:
    """A queued piece of work and when it arrived (monotonic seconds)."""

    work: GenerationRow | _EmbedJob
    tokens: int
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Serves one instance's requests in batches chosen by ``policy``."""

    def __init__(
        self,
        instance: Instance,
        policy: BatchingPolicy,
        on_batch: Callable[[Instance, int], None] | None = None,
    ) -> None:
        self._instance = instance
        self.policy = policy
        self._on_batch = on_batch  # told each batch's size when it starts (metrics)
        self._queue: deque[_Entry] = deque()
        self._lock = threading.RLock()  # on_done may run while admission holds it
        self._arrived = asyncio.Event()
        self._loop_thread = threading.get_ident()  # made on the event loop
        self._runner: asyncio.Task[None] | None = None
        self._running_tokens: dict[GenerationRow, int] = {}
        self._counted: BaseException | None = None  # the last failure reported
        # Whether the model batches by itself, decided once: an isinstance check against
        # a runtime protocol costs microseconds, too much for every request.
        self._inline: bool | None = None  # whether rows may run on the loop (decided once)
        self.batches = 0  # batches started (a running batch that grows counts once)
        self.largest_batch = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- submitting (event loop) ----------------------------------------------------

    async def generate(self, generation: Generation) -> GenerationResult:
        engine = self._engine
        if engine is not None:  # the engine batches continuously itself
            return await engine.generate_async(generation)
        result = self.generate_now(generation)
        if result is not None:
            return result
        row = await self._queued_generation(generation)
        self._observe(row.error)
        return row.outcome()

    def generate_now(self, generation: Generation) -> GenerationResult | None:
        """The result at once when the row can run right here, without yielding the loop
        (an inline model, nothing queued, a policy that starts it now); else None and the
        caller goes through ``generate``. Callers skip a task per request this way."""
        if not self._starts_inline_now(_tokens(generation)):
            return None
        row = GenerationRow.of(generation, _no_callback)
        self._generate_inline(row)
        self._observe(row.error)
        return row.outcome()

    @cached_property
    def _engine(self) -> AsyncGenerating | None:
        """The model, when it batches generation itself; read once the model is loaded."""
        model = self._instance.model
        return model if isinstance(model, AsyncGenerating) else None

    async def _queued_generation(self, generation: Generation) -> GenerationRow:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GenerationRow] = loop.create_future()

        def on_done(row: GenerationRow) -> None:  # instance thread or event loop
            with self._lock:
                self._running_tokens.pop(row, None)
            if threading.get_ident() == self._loop_thread:  # inline model: no wake-up needed
                _resolve(done, row)
            else:
                loop.call_soon_threadsafe(_resolve, done, row)

        row = GenerationRow.of(generation, on_done)
        self._submit(_Entry(row, _tokens(generation)))
        return await done

    def _observe(self, error: BaseException | None) -> None:
        """Tell the instance how its backend did; the instance counts failures in a row.

        Client mistakes and routerd's own refusals are not the backend's fault. One
        exception that failed a whole batch counts once, not once per row.
        """
        if error is None:
            self._instance.report_success()
            return
        if isinstance(error, InvalidRequest | RouterdError) or error is self._counted:
            return
        self._counted = error
        self._instance.report_failure(
            f"backend error: {error}" if str(error) else type(error).__name__,
            fatal=isinstance(error, ModelCrashed),
        )

    def _starts_inline_now(self, tokens: int) -> bool:
        """Whether a row may run right here: an inline model (not an engine that batches
        by itself), nothing queued ahead of it (so the runner is not mid-batch — an
        inline batch never yields the loop), and a policy that would start it at once.
        Such a row skips the queue, its future and the runner's wake-up; anything else
        goes through the queue as usual."""
        if self._inline is None:  # decided once, like ``_engine``
            self._inline = self._instance.model.info.inline and self._engine is None
        return (
            self._inline
            and not self._queue
            and self.policy.admit([Queued(tokens=tokens, waited_s=0.0)], []) > 0
        )

    def _generate_inline(self, row: GenerationRow) -> None:
        self.batches += 1
        if not self.largest_batch:
            self.largest_batch = 1
        if self._on_batch is not None:
            self._on_batch(self._instance, 1)
        try:
            self._instance.model.generate_batch([row], None, 1)  # alone: nothing joins
        except Exception as exc:  # the model broke; the row carries the error
            if row.result is None and row.error is None:
                row.error = exc

    async def embed(self, prepare: PrepareInputs, tokens: int) -> Embedding:
        """Embed what ``prepare`` yields; ``tokens`` estimates its size for admission."""
        embedder = self._embedder
        if embedder is not None:  # the engine batches pooling requests itself
            return await self._embed_async(embedder, prepare)
        future: asyncio.Future[Embedding] = asyncio.get_running_loop().create_future()
        self._submit(_Entry(_EmbedJob(prepare, future, tokens), tokens))
        try:
            embedded = await future
        except Exception as exc:
            self._observe(exc)
            raise
        self._observe(None)
        return embedded

    @cached_property
    def _kv_tokens(self) -> int:
        """What the instance's KV cache is reserved for (0: the backend bounds its own)."""
        return self._instance.model.info.kv_tokens

    @cached_property
    def _embedder(self) -> AsyncEmbedding | None:
        """The model, when it batches embeddings itself; read once the model is loaded."""
        model = self._instance.model
        return model if isinstance(model, AsyncEmbedding) else None

    async def _embed_async(self, embedder: AsyncEmbedding, prepare: PrepareInputs) -> Embedding:
        """Tokenize on the instance thread (its tokenizer's one user), pool in the engine."""
        try:
            token_ids = await self._instance.call(prepare, self._instance.model)
            vectors = await embedder.embed_async(token_ids)
        except Exception as exc:
            self._observe(exc)
            raise
        self._observe(None)
        return Embedding(token_ids, vectors)

    def _submit(self, entry: _Entry) -> None:
        with self._lock:
            self._queue.append(entry)
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(
                self._run(), name=f"batcher {self._instance.model_id}"
            )

    async def close(self) -> None:
        """Stop the loop; work still queued fails with a clear 503 instead of waiting."""
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        stopped = Unavailable(f"{self._instance.model_id} stopped serving", retry_after=1)
        for entry in queued:
            _fail(entry, stopped)

    # -- the loop (event loop) ------------------------------------------------------

    async def _run(self) -> None:
        """Start batches while work is queued; exit when the queue is empty."""
        while True:
            self._arrived.clear()
            with self._lock:
                if not self._queue:
                    return
                started = self._take(running=[], limit=self.policy.max_rows)
            if not started:
                with self._lock:
                    views = self._views(self.policy.max_rows)
                await self._pause(self.policy.wait_s(views))
                continue
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(started))
            if self._on_batch is not None:
                self._on_batch(self._instance, len(started))
            try:
                if self._instance.model.info.task is Task.EMBED:
                    await self._embed([e.work for e in started if isinstance(e.work, _EmbedJob)])
                else:
                    rows = [e.work for e in started if isinstance(e.work, GenerationRow)]
                    await self._instance.call(
                        self._instance.model.generate_batch,
                        rows,
                        self._admit_more,
                        self.policy.max_rows,
                    )
            except Exception as exc:  # the backend broke the whole batch: fail its rows
                log.exception("batch on %s failed", self._instance.model_id)
                for entry in started:
                    _fail(entry, exc)
                self._fail_joined(exc)

    def _fail_joined(self, exc: Exception) -> None:
        """Fail rows that joined the broken batch mid-way and were left unfinished.

        A backend should finish every row it was given, but one that raised past its
        rows must not leave their requests waiting for ever.
        """
        with self._lock:
            orphans = [row for row in self._running_tokens if row.result is None]
        for row in orphans:
            if row.error is None:
                row.error = exc
                row.on_done(row)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), max(seconds, 0.0005))

    async def _embed(self, jobs: list[_EmbedJob]) -> None:
        outcomes = await self._instance.call(_embed_batch, self._instance.model, jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    # -- admission (under the lock; also from the instance thread) ------------------

    def _views(self, limit: int) -> list[Queued]:
        """The first ``limit`` + 1 queued requests as the policy sees them.

        Admission takes requests in order, so the policy never needs more than one
        beyond what could be admitted (that one tells it more are waiting); building
        views of a long queue at every decode step would cost more than the step.
        """
        now = time.monotonic()
        return [
            Queued(tokens=e.tokens, waited_s=now - e.queued_at)
            for e in itertools.islice(self._queue, limit + 1)
        ]

    def _take(self, running: list[int], limit: int) -> list[_Entry]:
        """Pop what the policy admits now (at most ``limit``); rows whose client left are
        finished as cancelled instead of started."""
        taken: list[_Entry] = []
        kv_tokens = self._kv_tokens
        while self._queue and len(taken) < limit:
            count = min(self.policy.admit(self._views(limit - len(taken)), running), limit)
            if count <= 0:
                break
            for _ in range(min(count, len(self._queue))):
                entry = self._queue[0]
                if kv_tokens and not _fits_cache(running, entry.tokens, kv_tokens):
                    return taken  # it waits for rows to finish; nothing overtakes it
                self._queue.popleft()
                work = entry.work
                if isinstance(work, GenerationRow) and work.cancellation.cancelled:
                    work.result = GenerationResult("", len(work.prompt_ids), 0, "cancelled")
                    work.on_done(work)
                    continue
                if isinstance(work, _EmbedJob) and work.future.done():
                    continue  # its request was cancelled (deadline, shutdown) while queued
                if isinstance(work, GenerationRow):
                    self._running_tokens[work] = entry.tokens
                    running = [*running, entry.tokens]
                taken.append(entry)
            if not any(isinstance(e.work, GenerationRow) for e in taken) and taken:
                break  # embedding jobs: one admission per batch
        return taken

    def _admit_more(self, free_slots: int) -> list[GenerationRow]:
        """Called by the backend between decode steps, on the instance thread."""
        with self._lock:
            if not self._queue or free_slots <= 0:
                return []
            running = list(self._running_tokens.values())
            taken = self._take(running, free_slots)
        rows = [e.work for e in taken if isinstance(e.work, GenerationRow)]
        if rows:
            self.largest_batch = max(self.largest_batch, len(running) + len(rows))
        return rows


def _embed_batch(model: LoadedModel, jobs: list[_EmbedJob]) -> list[Embedding | Exception]:
    """Prepare every job (a bad one fails alone), then one forward pass for the rest."""
    prepared: list[list[list[int]] | Exception] = []
    for job in jobs:
        try:
            prepared.append(job.prepare(model))
        except Exception as exc:
            prepared.append(exc)
    inputs = [
        ids for ids_or_error in prepared if isinstance(ids_or_error, list) for ids in ids_or_error
    ]
    vectors = model.embed(inputs) if inputs else []
    outcomes: list[Embedding | Exception] = []
    start = 0
    for ids_or_error in prepared:
        if isinstance(ids_or_error, Exception):
            outcomes.append(ids_or_error)
            continue
        count = len(ids_or_error)
        outcomes.append(Embedding(ids_or_error, vectors[start : start + count]))
        start += count
    return outcomes


def _fits_cache(running: Sequence[int], tokens: int, kv_tokens: int) -> bool:
    """Whether a row of ``tokens`` (prompt + max_tokens) may join rows ``running``
    within a KV cache reserved for ``kv_tokens``: a padded batch holds rows × its
    longest row. A first row always fits (the context bounds it, and the cache holds at
    least one full context)."""
    if not running:
        return True
    longest = max(tokens, max(running))
    return (len(running) + 1) * longest <= kv_tokens


def _tokens(generation: Generation) -> int:
    """The most tokens the sequence can hold: what a batching policy budgets for it."""
    return len(generation.prompt_ids) + generation.params.max_tokens


def _no_callback(row: GenerationRow) -> None:
    """``on_done`` of a row run inline: the caller reads the row when the call returns."""


def _resolve(future: asyncio.Future[GenerationRow], row: GenerationRow) -> None:
    if not future.done():
        future.set_result(row)


def _fail(entry: _Entry, exc: Exception) -> None:
    work = entry.work
    if isinstance(work, _EmbedJob):
        if not work.future.done():
            work.future.set_exception(exc)
    elif work.result is None and work.error is None:
        work.error = exc
        work.on_done(work)
