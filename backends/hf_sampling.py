"""Choosing the next token of one row from its logits, as vLLM does.

Two paths, chosen once per row when it joins (:func:`is_plain`):

- a row that asks for nothing beyond temperature, top-p and a seed — nearly every
  request — takes :func:`sample` (or the batch's one argmax when greedy), the path
  the decode loop has always had, with nothing added per step;
- a row that shapes its logits gets a :class:`LogitsShaper`, which applies vLLM's
  steps in vLLM's (v1) order on a float32 copy of the row's logits:
  ``allowed_token_ids`` → ``min_tokens`` → ``logit_bias`` → repetition, frequency and
  presence penalties → (greedy: argmax here) → temperature → ``min_p`` → ``top_k`` →
  ``top_p`` → a draw from the row's generator.

The order matters where steps do not commute: greedy decoding sees bias, masks and
penalties but no cut, and ``min_p`` is measured before ``top_k``/``top_p`` renormalize
(so ``top_p`` counts the mass of what ``min_p`` left, as in vLLM's engine). Masking,
adding and the penalties commute with one another on finite logits, and -inf stays
-inf through all of them.

A shaper keeps the row's output-token counts as a tensor on the logits' device and
adds one per token, so penalties cost the same at the thousandth token as at the
first, with no list of outputs walked and no host-to-device copy per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from contract.errors import InvalidRequest
from contract.generation import SamplingParams, shapes_logits


def is_plain(params: SamplingParams) -> bool:
    """Whether a row takes the decode loop's original path: its logits need nothing
    beyond temperature and top-p, it wants no logprobs, and only EOS ends it early."""
    return (
        not shapes_logits(params)
        and params.logprobs is None
        and not params.ignore_eos
        and not params.stop_token_ids
    )


def sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> int:
    """Pick the next token from one row of logits: greedy, or temperature + top-p."""
    if params.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng).item())
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    outside = mass_before >= params.top_p  # the mass before a token already reaches top_p
    outside[0] = False  # the most likely token always stays
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=rng)
    return int(order[choice].item())


def _ids(ids: Iterable[int], vocab: int, param: str) -> list[int]:
    """``ids`` as a list, each checked to index a logits row of ``vocab`` entries."""
    listed = [int(i) for i in ids]
    if any(i < 0 or i >= vocab for i in listed):
        raise InvalidRequest(f"{param} holds a token id outside 0..{vocab - 1}", param=param)
    return listed


class LogitsShaper:
    """The logits processing and sampling of one row whose params shape its logits.

    Built when the row joins; the tensors it needs (masks, bias, counts) are made on
    the first step, when the logits show their size and device. ``end_ids`` are the
    tokens ``min_tokens`` holds back: the model's EOS ids and the row's stop ids.
    """

    def __init__(
        self, params: SamplingParams, prompt_ids: Sequence[int], end_ids: Iterable[int]
    ) -> None:
        self.params = params
        self._prompt_ids = prompt_ids
        self._end_ids = sorted(set(end_ids))
        self._ready = False
        self._allowed: torch.Tensor | None = None  # bool [vocab]: True = may be sampled
        self._bias_ids: torch.Tensor | None = None
        self._bias_values: torch.Tensor | None = None
        self._ends: torch.Tensor | None = None  # ids held back while under min_tokens
        self._prompt_seen: torch.Tensor | None = None  # bool [vocab], repetition penalty only
        self.counts: torch.Tensor | None = None  # float32 [vocab]: output tokens so far
        self._produced = 0

    def _prepare(self, logits: torch.Tensor) -> None:
        """Build the row's tensors for logits of this size, on their device."""
        params, vocab, device = self.params, logits.shape[-1], logits.device
        if params.allowed_token_ids is not None:
            allowed = _ids(params.allowed_token_ids, vocab, "allowed_token_ids")
            self._allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._allowed[torch.tensor(allowed, dtype=torch.long, device=device)] = True
        if params.logit_bias:
            ids = _ids(params.logit_bias.keys(), vocab, "logit_bias")
            self._bias_ids = torch.tensor(ids, dtype=torch.long, device=device)
            values = [float(v) for v in params.logit_bias.values()]
            self._bias_values = torch.tensor(values, dtype=torch.float32, device=device)
        if params.min_tokens > 0:
            ends = [i for i in self._end_ids if 0 <= i < vocab]  # ids past the head never come
            self._ends = torch.tensor(ends, dtype=torch.long, device=device)
        if params.repetition_penalty != 1.0:
            prompt = _ids(self._prompt_ids, vocab, "prompt")
            self._prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._prompt_seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        if (
            params.repetition_penalty != 1.0
            or params.frequency_penalty != 0.0
            or params.presence_penalty != 0.0
        ):
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self._ready = True

    def count(self, token: int) -> None:
        """Record a generated token (after it was chosen): counts and ``min_tokens``."""
        self._produced += 1
        if self.counts is not None:
            self.counts[token] += 1.0

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits after masks, bias and penalties (greedy takes the argmax of
        this); a float32 copy, ``logits`` itself is left as it was."""
        if not self._ready:
            self._prepare(logits)
        params = self.params
        x = logits.to(dtype=torch.float32, copy=True)
        if self._allowed is not None:
            x.masked_fill_(~self._allowed, float("-inf"))
        if self._ends is not None and self._produced < params.min_tokens:
            x[self._ends] = float("-inf")
        if self._bias_ids is not None and self._bias_values is not None:
            x.index_add_(0, self._bias_ids, self._bias_values)
        if self.counts is not None:
            if self._prompt_seen is not None:
                seen = self._prompt_seen | (self.counts > 0)
                penalty = params.repetition_penalty
                x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
            if params.frequency_penalty != 0.0:
                x -= params.frequency_penalty * self.counts
            if params.presence_penalty != 0.0:
                x -= params.presence_penalty * (self.counts > 0).to(torch.float32)
        return x

    def choose(self, logits: torch.Tensor, rng: torch.Generator | None) -> int:
        """The next token: the argmax of the processed logits at temperature 0, else a
        draw from what temperature, ``min_p``, ``top_k`` and ``top_p`` leave."""
        x = self.process(logits)
        params = self.params
        if params.temperature <= 0:
            return int(torch.argmax(x).item())
        x /= params.temperature
        if params.min_p > 0.0:
            probs = torch.softmax(x, dim=-1)
            x.masked_fill_(probs < params.min_p * probs.max(), float("-inf"))
        if 0 < params.top_k < x.shape[-1]:
            kth = torch.topk(x, params.top_k).values[-1]
            x.masked_fill_(x < kth, float("-inf"))  # ties with the k-th stay, as in vLLM
        probs = torch.softmax(x, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            outside = mass_before >= params.top_p
            outside[0] = False  # the most likely token always stays
            probs = probs.index_fill(0, order[outside], 0.0)
        return int(torch.multinomial(probs, 1, generator=rng).item())
