"""Batching: which queued requests an instance runs together, and when.

Pure (DESIGN.md rule 2): the instance's batcher passes what is queued and what is
running; the policy answers with a number of rows to admit, or how long to wait.

Protocol methods, who calls them and when:

- ``admit(queued, running)`` — the batcher of one instance, (a) whenever the
  instance is idle and something is queued, and (b) at every decode-step boundary
  of a running batch (continuous batching). Returns how many of ``queued``, taken in
  order, start now; 0 means "not yet".
- ``wait_s(queued)`` — the batcher, right after ``admit`` returned 0 on an idle
  instance: how long to wait for more requests before asking ``admit`` again.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)  # not frozen: built per request, where frozen costs 4x
class Queued:
    """A request waiting in an instance's queue."""

    tokens: int  # what it may occupy: prompt tokens + max_tokens (inputs' tokens for embeddings)
    waited_s: float  # since it was queued


class BatchingPolicy(Protocol):
    name: str

    @property
    def max_rows(self) -> int:
        """The most rows a batch may hold; read by the batcher once per batch."""
        ...

    @property
    def max_tokens(self) -> int | None:
        """The most tokens a batch may hold (None: no limit but rows × context); read
        once at load, where the instance's KV cache is sized for it."""
        ...

    def admit(self, queued: Sequence[Queued], running: Sequence[int]) -> int:
        """How many of ``queued`` (in order) start now; ``running`` holds the token
        budgets of the rows already decoding (empty when the instance is idle)."""
        ...

    def wait_s(self, queued: Sequence[Queued]) -> float:
        """Seconds to wait for more requests before ``admit`` is asked again."""
        ...


@dataclass(frozen=True)
class NoBatching:
    """Batches of one: each request runs alone, in arrival order.

    1. Something is running → 0 (wait for it to finish).
    2. Otherwise → 1.
    """

    name: str = "none"

    @property
    def max_rows(self) -> int:
        return 1

    @property
    def max_tokens(self) -> int | None:
        return None

    def admit(self, queued: Sequence[Queued], running: Sequence[int]) -> int:
        return 0 if running or not queued else 1

    def wait_s(self, queued: Sequence[Queued]) -> float:
        return 0.0


MAX_BATCH_ROWS = 1 << 20
"""The most rows ``max_batch_size`` may ask for: far more than any device batches, and
within what the batcher's slicing of its queue takes (``sys.maxsize``)."""


@dataclass(frozen=True)
class DynamicBatching:
    """Collect requests for up to ``max_wait_ms``, run up to ``max_batch_size`` together.

    Decision tree for ``admit``:

    1. Nothing queued, or the batch already has ``max_batch_size`` rows → 0.
    2. A batch is running → join it now, as many as fit both the free rows and the
       token budget (``max_batch_tokens``; a first row always fits an empty batch).
    3. Idle, and a full batch is queued (rows or tokens), or the oldest request has
       waited ``max_wait_ms`` → start with as many as fit.
    4. Idle and neither → 0; ``wait_s`` says how long until the oldest's wait is up.
    """

    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    max_batch_tokens: int = 16384
    name: str = "dynamic"

    def __post_init__(self) -> None:
        # Parameters come from model options (JSON): a float row count or a NaN wait
        # would pass the range checks and leave the batcher unable to start a batch.
        for key, most in (("max_batch_size", MAX_BATCH_ROWS), ("max_batch_tokens", None)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer of at least 1, got {value!r}")
            if most is not None and value > most:
                raise ValueError(f"{key} must be at most {most}, got {value}")
        wait = self.max_wait_ms
        number = isinstance(wait, int | float) and not isinstance(wait, bool)
        if not number or not 0 <= wait <= sys.float_info.max:
            raise ValueError(f"max_wait_ms must be a finite number of at least 0, got {wait!r}")

    @property
    def max_rows(self) -> int:
        return self.max_batch_size

    @property
    def max_tokens(self) -> int | None:
        return self.max_batch_tokens

    def _fitting(self, queued: Sequence[Queued], running: Sequence[int]) -> int:
        rows = len(running)
        tokens = sum(running)
        taken = 0
        for item in queued:
            if rows + taken >= self.max_batch_size:
                break
            if rows + taken > 0 and tokens + item.tokens > self.max_batch_tokens:
                break
            tokens += item.tokens
            taken += 1
        return taken

    def admit(self, queued: Sequence[Queued], running: Sequence[int]) -> int:
        if not queued or len(running) >= self.max_batch_size:
            return 0
        fitting = self._fitting(queued, running)
        if running:
            return fitting
        full = fitting < len(queued) or fitting >= self.max_batch_size
        if full or queued[0].waited_s * 1000 >= self.max_wait_ms:
            return fitting
        return 0

    def wait_s(self, queued: Sequence[Queued]) -> float:
        if not queued:
            return 0.0
        return max(self.max_wait_ms / 1000 - queued[0].waited_s, 0.0)


BATCHING_POLICIES: dict[str, Callable[..., Any]] = {
    "none": NoBatching,
    "dynamic": DynamicBatching,
}

# Sensible defaults: GPUs gain most from wide batches; two CPU cores saturate sooner.
DEFAULT_BATCHING = {
    "cpu": {"max_batch_size": 8, "max_wait_ms": 5.0, "max_batch_tokens": 16384},
    "cuda": {"max_batch_size": 32, "max_wait_ms": 5.0, "max_batch_tokens": 65536},
}
