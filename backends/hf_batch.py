"""Batched decoding for the transformers backend: many rows, one forward pass per step.

Every row of a batch keeps its own settings (every field of ``SamplingParams``: how
its next token is chosen is :mod:`backends.hf_sampling`'s, its logprobs
:mod:`backends.hf_logprobs`'), its own text state (:mod:`backends.hf_text`) and
finishes on its own. A row that asks for no more than temperature, top-p and a seed
costs nothing beyond the batch's one argmax or :func:`sample` per step: the work
other fields need is done only for rows that set them.
Rows join a running batch between steps (continuous batching):

- New rows are prefilled together as a small batch of their own (in several passes
  where together they would exceed one context's tokens), left-padded to a
  common length with an attention mask, and their KV cache is merged into the
  running batch's — both sides left-padded with masked zeros to a common length,
  then concatenated along the batch dimension.
- Every forward pass gets explicit position ids: a row's tokens sit at its own
  positions (0, 1, 2, … from its first prompt token), whatever padding the batch
  puts in front of them. With the padding masked out, a row computes what it
  would compute alone, so its greedy output does not depend on the batch.
- Finished rows leave the cache at once, and columns that only padding still
  uses are cut off, so the batch never grows beyond what its live rows need.

The running batch's cache grows in place (:mod:`backends.hf_cache`): a step writes
its column into room the layer kept, instead of copying the whole cache. Merging needs
plain full-attention layers, whose keys and values can be padded and stacked; for
other caches (sliding windows, linear attention) the batch admits new rows only when
it is empty.

On the CPU, memory a pass freed goes back to the kernel (``Decoder.release_memory``,
:mod:`backends.heap`) after each large prefill pass, whenever rows leave, and when the
batch drains: the instance then holds what its ledger entry counts (weights, the KV
its rows use, one pass's working memory), not the high-water mark of every pass.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backends import hf_cache, hf_logprobs
from backends.base import GenerationRow, RowSource, free_slots
from backends.hf_sampling import LogitsShaper, is_plain, sample
from backends.hf_text import IncrementalDetokenizer, StopStringHoldback
from contract.errors import OutOfMemory
from contract.generation import GenerationResult, Logprob, shapes_logits

log = logging.getLogger("routerd.backends")

RELEASE_AFTER_TOKENS = 256  # padded tokens of a prefill pass worth a release after it


@dataclass(frozen=True)
class Decoder:
    """What the decode loop needs from a loaded causal model."""

    model: Any
    device: torch.device
    cache_arg: str  # "cache" or "past_key_values", as the model's forward names it
    keep_arg: str | None  # "logits_to_keep" where the forward takes it
    pad_id: int
    eos_ids: frozenset[int]
    context_length: int
    decode: Callable[[Sequence[int]], str]
    check: Callable[[Sequence[int]], None]  # raises InvalidRequest for a bad prompt
    release_memory: Callable[[], None] | None = None  # gives freed heap back (CPU only)
    # One id's own text, special tokens included (logprobs name EOS as the tokenizer
    # writes it); None: ``decode`` of the id alone.
    token_text: Callable[[int], str] | None = None

    def text_of(self, token: int) -> str:
        return self.token_text(token) if self.token_text is not None else self.decode([token])


class _Seq:
    """The decoding state of one row: its sampler, text state and counts.

    ``plain`` rows (:func:`backends.hf_sampling.is_plain`) are chosen for by the batch
    (:meth:`_Batch._take`) and only ``accept`` their token; the others ``take`` their
    logits and do what their params ask: logprobs, a ``LogitsShaper`` where the
    logits are shaped, and ``enders`` that are not simply the model's EOS ids.
    """

    def __init__(self, row: GenerationRow, decoder: Decoder) -> None:
        self.row = row
        params = self.params = row.params
        self.rng: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            self.rng = torch.Generator(device=decoder.device)
            self.rng.manual_seed(params.seed)
        self.plain = is_plain(params)
        stop_ids = frozenset(params.stop_token_ids)
        # The tokens that end the row; EOS among them unless ignore_eos.
        self.enders = (frozenset() if params.ignore_eos else decoder.eos_ids) | stop_ids
        self.shaper: LogitsShaper | None = None
        if shapes_logits(params):
            self.shaper = LogitsShaper(params, row.prompt_ids, decoder.eos_ids | stop_ids)
        self.logprobs: list[Logprob] | None = None if params.logprobs is None else []
        self.prompt_logprobs: list[Logprob | None] | None = None
        self.text_of = decoder.text_of
        self.detok = IncrementalDetokenizer(decoder.decode, context=row.prompt_ids)
        self.stops = StopStringHoldback(params.stop, params.include_stop_str_in_output)
        self.pieces: list[str] = []
        prompt_len = len(row.prompt_ids)
        self.budget = min(self.params.max_tokens, decoder.context_length - prompt_len)
        self.produced = 0
        self.token = 0  # the last sampled token, fed to the next step
        self.position = prompt_len  # where ``token`` sits in the row's own sequence

    def take(self, logits: torch.Tensor, greedy: int) -> str | None:
        """Choose the token of a row that is not plain from its logits (``greedy``: their
        argmax) and ``accept`` it with its logprob where asked."""
        params = self.params
        raw = hf_logprobs.raw(logits) if params.logprobs is not None else None
        if self.shaper is not None:
            token = self.shaper.choose(logits, self.rng)
            self.shaper.count(token)
        elif params.temperature <= 0:
            token = greedy
        else:
            token = sample(logits, params, self.rng)
        entry = None
        if raw is not None and params.logprobs is not None:
            entry = hf_logprobs.entry(raw, token, params.logprobs, self.text_of)
        return self.accept(token, entry)

    def accept(self, token: int, entry: Logprob | None = None) -> str | None:
        """Take a sampled token (and its logprob, when the row asked for them); return
        the finish reason if the row is done. The logprob goes out before any text."""
        self.produced += 1
        if entry is not None and self.logprobs is not None:
            self.logprobs.append(entry)
            if self.row.on_logprob is not None:
                self.row.on_logprob(entry)
        if token in self.enders:  # a stop id's text is not part of the output
            return "stop"
        text = self.detok.add(token)
        if self.produced < self.params.min_tokens:  # as vLLM: no stop string before min_tokens
            self._emit(text)
        else:
            self._emit(self.stops.push(text))
        if self.stops.stopped:
            return "stop"
        if self.produced >= self.budget:
            return "length"
        self.token = token
        self.position = len(self.row.prompt_ids) + self.produced - 1
        return None

    def result(self, reason: str) -> GenerationResult:
        """Release the held-back text and build the row's result."""
        if not self.stops.stopped:
            self._emit(self.stops.push(self.detok.flush()))
            self._emit(self.stops.flush())
        return GenerationResult(
            text="".join(self.pieces),
            prompt_tokens=len(self.row.prompt_ids),
            completion_tokens=self.produced,
            finish_reason="stop" if self.stops.stopped else reason,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self.row.on_text is not None:
                self.row.on_text(text)


def _done(row: GenerationRow, seq: _Seq | None, reason: str, error: BaseException | None) -> None:
    """Finish ``row`` with a result (from ``seq``) or ``error``; call on_done once."""
    if error is None and seq is not None:
        try:
            row.result = seq.result(reason)
        except Exception as exc:  # the row's own sink failed: only this row fails
            error = exc
    elif error is None:
        row.result = GenerationResult("", len(row.prompt_ids), 0, reason)
    if error is not None:
        row.result, row.error = None, error
    try:
        row.on_done(row)
    except Exception:  # one caller's callback must not end the other rows
        log.exception("on_done of a generation row failed")


def _forward_error(exc: Exception, rows: int) -> Exception:
    """What the rows of a failed forward pass report."""
    if isinstance(exc, torch.OutOfMemoryError):
        traceback.clear_frames(exc.__traceback__)
        return OutOfMemory(f"the device ran out of memory decoding a batch of {rows} rows: {exc}")
    return exc


class _Batch:
    """The running batch: its rows, their shared KV cache and attention mask."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.seqs: list[_Seq] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [rows, cached columns], 1 = real token
        self.pending: list[_Seq] = []  # accepted rows not yet prefilled, in order

    @property
    def can_join(self) -> bool:
        """Whether rows may join now: the batch is empty or its cache can be merged."""
        return not self.seqs or hf_cache.is_growing(self.cache)

    def join(self, rows: Sequence[GenerationRow]) -> None:
        """Prefill ``rows`` as a batch of their own and merge them into the running one."""
        fresh: list[_Seq] = []
        for row in rows:
            try:
                self.decoder.check(row.prompt_ids)
                seq = _Seq(row, self.decoder)
            except Exception as exc:  # a bad prompt fails its own row only
                _done(row, None, "", exc)
                continue
            if row.cancellation.cancelled:
                _done(row, seq, "cancelled", None)
            elif row.params.prompt_logprobs is not None and not self._score_prompt(seq):
                continue  # its pass failed, and so did the row
            elif seq.budget <= 0:  # max_tokens 0: the prompt's logprobs were all it asked
                _done(row, seq, "length", None)
            else:
                fresh.append(seq)
        self.pending.extend(fresh)
        self.prefill_pending()

    def _score_prompt(self, seq: _Seq) -> bool:
        """Set the row's prompt logprobs (a pass over its prompt alone); False, with the
        row finished, when that pass failed."""
        top, ids, decoder = seq.params.prompt_logprobs or 0, seq.row.prompt_ids, self.decoder
        try:
            seq.prompt_logprobs = hf_logprobs.prompt_logprobs(
                decoder.model, decoder.device, decoder.cache_arg, ids, top, seq.text_of
            )
        except Exception as exc:  # e.g. out of memory: this row fails, the batch goes on
            _done(seq.row, None, "", _forward_error(exc, 1))
            return False
        finally:
            if len(seq.row.prompt_ids) >= RELEASE_AFTER_TOKENS:
                self.release_memory()
        return True

    def prefill_pending(self) -> None:
        """Prefill waiting rows, one context's worth of tokens per pass, while they may
        join (a cache that cannot merge takes them once the batch is empty)."""
        while self.pending and self.can_join:
            group = _prefill_group(self.pending, self.decoder.context_length)
            del self.pending[: len(group)]
            live = []
            for seq in group:
                if seq.row.cancellation.cancelled:
                    _done(seq.row, seq, "cancelled", None)
                else:
                    live.append(seq)
            if live:
                self._prefill(live)

    def _prefill(self, fresh: list[_Seq]) -> None:
        """One forward pass over ``fresh`` rows' prompts; merge them into the batch."""
        device = self.decoder.device
        width = max(len(s.row.prompt_ids) for s in fresh)
        ids = torch.full((len(fresh), width), self.decoder.pad_id, dtype=torch.long)
        mask = torch.zeros((len(fresh), width), dtype=torch.long)
        for i, seq in enumerate(fresh):
            prompt = list(seq.row.prompt_ids)
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        # Each row counts positions from its own first token; padding sits at 0.
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        try:
            logits, cache = self._forward(ids, positions, mask, None)
        except Exception as exc:  # e.g. out of memory: the new rows fail, the batch goes on
            error = _forward_error(exc, len(fresh))
            for seq in fresh:
                _done(seq.row, None, "", error)
            self.release_memory()
            return
        large = ids.numel() >= RELEASE_AFTER_TOKENS
        if large:
            self.release_memory()  # the pass's activations, before the merge copies
        start = len(self.seqs)
        self._merge(cache, mask, fresh)
        del cache
        self._take(start, logits)
        if large:
            self.release_memory()  # the buffers the merge replaced

    def step(self) -> None:
        """One decode step for every row; cancelled rows leave first."""
        cancelled = [s for s in self.seqs if s.row.cancellation.cancelled]
        for seq in cancelled:
            _done(seq.row, seq, "cancelled", None)
        self._drop(cancelled)
        if not self.seqs or self.mask is None:
            return
        device = self.decoder.device
        ids = torch.tensor([[s.token] for s in self.seqs], dtype=torch.long, device=device)
        positions = torch.tensor([[s.position] for s in self.seqs], dtype=torch.long)
        ones = torch.ones((len(self.seqs), 1), dtype=torch.long, device=device)
        mask = torch.cat([self.mask, ones], dim=1)
        try:
            logits, self.cache = self._forward(ids, positions.to(device), mask, self.cache)
        except Exception as exc:  # the whole pass failed: every row in it fails
            error = _forward_error(exc, len(self.seqs))
            failed, self.seqs, self.cache, self.mask = self.seqs, [], None, None
            for seq in failed:
                _done(seq.row, None, "", error)
            self.release_memory()
            return
        self.mask = mask
        self._take(0, logits)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns each row's last-position logits and the cache."""
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self.decoder.cache_arg] = cache
        if self.decoder.keep_arg is not None:
            kwargs[self.decoder.keep_arg] = 1
        out = self.decoder.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits, new_cache

    def release_memory(self) -> None:
        """Give the memory freed since the last call back to the kernel (CPU only)."""
        if self.decoder.release_memory is not None:
            self.decoder.release_memory()

    def _ceiling(self, seqs: Sequence[_Seq]) -> int:
        """The most cache columns any of ``seqs`` can need: its prompt and token budget."""
        return max((len(seq.row.prompt_ids) + seq.budget for seq in seqs), default=0)

    def _take(self, start: int, logits: torch.Tensor) -> None:
        """Sample a token for rows ``start:`` (one logits row each); finish those done."""
        seqs = self.seqs[start:]
        greedy: list[int] = logits.argmax(dim=-1).tolist()
        finished: list[_Seq] = []
        for i, seq in enumerate(seqs):
            error: Exception | None = None
            reason: str | None = None
            try:
                if not seq.plain:
                    reason = seq.take(logits[i], greedy[i])
                elif seq.params.temperature <= 0:
                    reason = seq.accept(greedy[i])
                else:
                    reason = seq.accept(sample(logits[i], seq.params, seq.rng))
            except Exception as exc:  # this row's sink or sampler failed; the rest go on
                error = exc
            if reason is not None or error is not None:
                _done(seq.row, seq, reason or "", error)
                finished.append(seq)
        self._drop(finished)

    def _merge(self, cache: Any, mask: torch.Tensor, fresh: list[_Seq]) -> None:
        """Append prefilled rows (their cache and mask) to the running batch."""
        limit = self._ceiling([*self.seqs, *fresh])
        if not self.seqs or self.mask is None:
            hf_cache.make_growing(cache, limit)  # other kinds stay as the model built them
            self.seqs, self.cache, self.mask = list(fresh), cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        hf_cache.set_limit(self.cache, limit)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.append_rows(theirs.keys, theirs.values)
        self.mask = torch.cat(
            [
                torch.nn.functional.pad(self.mask, (width - old, 0)),
                torch.nn.functional.pad(mask, (width - new, 0)),
            ],
            dim=0,
        )
        self.seqs.extend(fresh)

    def _drop(self, finished: list[_Seq]) -> None:
        """Remove finished rows from the batch and the columns only they needed."""
        if not finished:
            return
        gone = set(map(id, finished))
        keep = [i for i, seq in enumerate(self.seqs) if id(seq) not in gone]
        self.seqs = [self.seqs[i] for i in keep]
        if not self.seqs or self.mask is None:
            self.seqs, self.cache, self.mask = [], None, None
            self.release_memory()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        hf_cache.set_limit(self.cache, self._ceiling(self.seqs))
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        if self.can_join:  # only plain layers can be cut along the sequence
            first = int(self.mask.any(dim=0).int().argmax().item())
            if first > 0:  # columns that are padding for every remaining row
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.drop_front(first)
        self.release_memory()


def first_pass(lengths: Sequence[int], tokens: int) -> int:
    """How many of the sequences ``lengths`` (in order) one forward pass takes: as many
    as fit in ``tokens`` padded tokens (rows × the longest), and always at least one.

    An instance's working memory is measured on one pass of a whole context, so no
    pass may be larger: sequences that arrive together (a batch's new rows, a
    request's embedding inputs) take as many passes as that needs, in order.
    """
    width = lengths[0]
    count = 1
    for length in lengths[1:]:
        width = max(width, length)
        if (count + 1) * width > tokens:
            break
        count += 1
    return count


def _prefill_group(pending: list[_Seq], context_length: int) -> list[_Seq]:
    """The first rows of ``pending`` that one prefill pass takes (:func:`first_pass`)."""
    lengths = [len(seq.row.prompt_ids) for seq in pending]
    return pending[: first_pass(lengths, context_length)]


def generate_batch(
    decoder: Decoder,
    rows: Sequence[GenerationRow],
    admit: RowSource | None,
    max_rows: int | None = None,
) -> None:
    """Decode ``rows`` and every row ``admit`` adds, until none is left.

    Between steps ``admit`` is asked for up to ``max_rows`` minus the live rows
    (unbounded when ``max_rows`` is None). Each row ends with ``result`` or
    ``error`` set and its ``on_done`` called once.
    """
    batch = _Batch(decoder)
    incoming = list(rows)
    while True:
        if incoming:
            batch.join(incoming)
        else:
            batch.prefill_pending()
        if batch.seqs:
            batch.step()
        incoming = []
        if admit is not None and batch.can_join and not batch.pending:
            incoming = list(admit(max(0, free_slots(max_rows, len(batch.seqs)))))
        if not batch.seqs and not incoming and not batch.pending:
            return
