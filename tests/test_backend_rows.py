"""The row helpers of ``backends.base`` that backends and the batcher share: a finished
row's outcome, the free slots offered to ``admit``, and ``generate`` as a batch of one."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from backends.base import GenerationRow, RowSource, free_slots, generate_alone
from contract.errors import BackendError
from contract.generation import Cancellation, Generation, GenerationResult, SamplingParams


def _unwatched(row: GenerationRow) -> None:
    """``on_done`` of rows these tests read directly."""


def _row() -> GenerationRow:
    return GenerationRow([1, 2], SamplingParams(max_tokens=3), on_done=_unwatched)


def test_a_finished_row_gives_its_result() -> None:
    row = _row()
    row.result = GenerationResult("ab", 2, 2, "stop")
    assert row.outcome() is row.result


def test_a_failed_row_raises_its_own_error() -> None:
    row = _row()
    row.error = KeyError("broken sink")
    with pytest.raises(KeyError) as raised:
        row.outcome()
    assert raised.value is row.error


def test_an_unfinished_row_is_a_backend_error_not_none() -> None:
    with pytest.raises(BackendError, match="left a row unfinished"):
        _row().outcome()


def test_free_slots_count_down_from_the_cap() -> None:
    assert free_slots(4, 1) == 3
    assert free_slots(4, 4) == 0
    assert free_slots(2, 3) == -1
    assert free_slots(None, 1000) == free_slots(None, 0) - 1000
    assert free_slots(None, 1000) >= 1 << 20  # no cap: more than any batch holds


class _OneStepBatch:
    """A ``generate_batch`` that finishes each row with a fixed result or error."""

    def __init__(self, error: Exception | None = None, finish: bool = True) -> None:
        self.error = error
        self.finish = finish
        self.calls: list[tuple[list[GenerationRow], RowSource | None]] = []

    def __call__(self, rows: Sequence[GenerationRow], admit: RowSource | None) -> None:
        self.calls.append((list(rows), admit))
        for row in rows:
            if not self.finish:
                continue
            if self.error is None:
                row.result = GenerationResult("x", len(row.prompt_ids), 1, "length")
            else:
                row.error = self.error
            row.on_done(row)


def test_generate_alone_runs_one_row_with_nothing_admitted() -> None:
    batch = _OneStepBatch()
    pieces: list[str] = []
    cancellation = Cancellation()
    params = SamplingParams(max_tokens=1)
    result = generate_alone(batch, Generation([5, 6, 7], params, pieces.append, cancellation))
    assert result == GenerationResult("x", 3, 1, "length")
    [(rows, admit)] = batch.calls
    assert admit is None and len(rows) == 1
    (row,) = rows
    assert list(row.prompt_ids) == [5, 6, 7] and row.params is params
    assert row.on_text == pieces.append and row.cancellation is cancellation


def test_generate_alone_raises_the_rows_error_and_refuses_an_unfinished_row() -> None:
    error = ValueError("bad prompt")
    with pytest.raises(ValueError) as raised:
        generate_alone(_OneStepBatch(error), Generation([1], SamplingParams(1)))
    assert raised.value is error
    with pytest.raises(BackendError, match="unfinished"):
        generate_alone(_OneStepBatch(finish=False), Generation([1], SamplingParams(1)))
