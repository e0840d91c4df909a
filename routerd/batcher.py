"""One queue per instance, served by one loop that forms batches (the queue as an actor).

Requests (which already hold a lease) put their work in the instance's queue and
await the result. A single task per instance asks the batching policy what to start
and runs it on the instance's thread: generation rows through the backend's
``generate_batch`` — which asks the queue again at every decode step, so requests
arriving mid-batch join the running batch — and embedding requests merged into one
forward pass. Policies stay pure; the queue is the only shared state and is guarded
by a lock because the instance thread reads it between decode steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backends.base import (
    Cancellation,
    GenerationResult,
    GenerationRow,
    SamplingParams,
    Task,
    TextSink,
)
from policies import registry as policy_registry
from policies.batching import DEFAULT_BATCHING, BatchingPolicy, Queued
from routerd.instance import Instance

log = logging.getLogger("routerd.batcher")


@dataclass(eq=False)
class _EmbedJob:
    inputs: list[list[int]]
    future: asyncio.Future[list[list[float]]]
    tokens: int


@dataclass(eq=False)
class _Entry:
    """A queued piece of work and when it arrived (monotonic seconds)."""

    work: GenerationRow | _EmbedJob
    tokens: int
    queued_at: float = field(default_factory=time.monotonic)


class Batcher:
    """Serves one instance's requests in batches chosen by ``policy``."""

    def __init__(self, instance: Instance, policy: BatchingPolicy) -> None:
        self._instance = instance
        self.policy = policy
        self._queue: deque[_Entry] = deque()
        self._lock = threading.RLock()  # on_done may run while admission holds it
        self._arrived = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._running_tokens: dict[GenerationRow, int] = {}
        self.batches = 0  # batches started (a running batch that grows counts once)
        self.largest_batch = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- submitting (event loop) ----------------------------------------------------

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[GenerationRow] = loop.create_future()

        def on_done(row: GenerationRow) -> None:  # instance thread or event loop
            with self._lock:
                self._running_tokens.pop(row, None)
            loop.call_soon_threadsafe(_resolve, done, row)

        row = GenerationRow(list(prompt_ids), params, on_text, cancellation, on_done)
        self._submit(_Entry(row, len(prompt_ids) + params.max_tokens))
        finished = await done
        if finished.error is not None:
            raise finished.error
        assert finished.result is not None
        return finished.result

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        future: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        tokens = sum(len(ids) for ids in inputs)
        self._submit(_Entry(_EmbedJob(inputs, future, tokens), tokens))
        return await future

    def _submit(self, entry: _Entry) -> None:
        with self._lock:
            self._queue.append(entry)
        self._arrived.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(
                self._run(), name=f"batcher {self._instance.model_id}"
            )

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

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
            try:
                if self._instance.model.info.task is Task.EMBED:
                    await self._embed([e.work for e in started if isinstance(e.work, _EmbedJob)])
                else:
                    rows = [e.work for e in started if isinstance(e.work, GenerationRow)]
                    await self._instance.run(
                        self._instance.model.generate_batch,
                        rows,
                        self._admit_more,
                        self.policy.max_rows,
                    )
            except Exception as exc:  # the backend broke the whole batch: fail its rows
                log.exception("batch on %s failed", self._instance.model_id)
                for entry in started:
                    _fail(entry, exc)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), max(seconds, 0.0005))

    async def _embed(self, jobs: list[_EmbedJob]) -> None:
        inputs = [ids for job in jobs for ids in job.inputs]
        vectors = await self._instance.run(self._instance.model.embed, inputs)
        start = 0
        for job in jobs:
            count = len(job.inputs)
            if not job.future.done():
                job.future.set_result(vectors[start : start + count])
            start += count

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
        while self._queue and len(taken) < limit:
            count = min(self.policy.admit(self._views(limit - len(taken)), running), limit)
            if count <= 0:
                break
            for _ in range(min(count, len(self._queue))):
                entry = self._queue.popleft()
                work = entry.work
                if isinstance(work, GenerationRow) and work.cancellation.cancelled:
                    work.result = GenerationResult("", len(work.prompt_ids), 0, "cancelled")
                    work.on_done(work)
                    continue
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


BATCHING_OPTIONS = ("batching", "max_batch_size", "max_wait_ms", "max_batch_tokens")


def batching_policy(options: Mapping[str, Any], device: str) -> BatchingPolicy:
    """The policy a version asks for in its options, with the device kind's defaults."""
    name = str(options.get("batching", "dynamic"))
    params: dict[str, Any] = {}
    if name == "dynamic":
        params.update(DEFAULT_BATCHING["cuda" if device.startswith("cuda") else "cpu"])
    params.update({k: options[k] for k in BATCHING_OPTIONS[1:] if k in options})
    policy_registry.check("batching", name)
    policy: BatchingPolicy = policy_registry.create("batching", name, **params)
    return policy
