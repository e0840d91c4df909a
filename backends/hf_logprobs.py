"""Log-probabilities for the transformers backend: of generated tokens, and of a prompt.

Both are the model's own distribution — ``log_softmax`` of its logits in float32,
before any bias, penalty, mask or temperature (vLLM's "raw" logprobs) — so what a
client reads does not depend on how it asked to sample.

Prompt logprobs need the logits at every prompt position, which the batched prefill
never keeps (it asks the model for the last position only: a prompt's logits are
positions × vocabulary, often larger than the rest of the pass). They come from a
pass of their own over the prompt, in chunks that carry a KV cache from one to the
next, so no more than one chunk's logits exist at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from contract.generation import Logprob

TokenText = Callable[[int], str]
"""One token id's own text, special tokens included (the ``token`` of a ``Logprob``)."""

PROMPT_CHUNK = 256  # prompt positions per pass, at most
CHUNK_LOGITS = 1 << 24  # logits per pass, at most: large vocabularies get shorter chunks


def entry(logprobs: torch.Tensor, token: int, top: int, text: TokenText) -> Logprob:
    """The ``Logprob`` of ``token`` from one position's log-probabilities (float32, one
    per vocabulary id), with its ``top`` most likely alternatives, most likely first."""
    values, ids = _top(logprobs, top)
    return Logprob(
        token,
        text(token),
        float(logprobs[token].item()),
        [Logprob(i, text(i), v) for i, v in zip(ids, values, strict=True)],
    )


def _top(logprobs: torch.Tensor, top: int) -> tuple[list[float], list[int]]:
    """The ``top`` largest values of a 1-d tensor and their indices, largest first."""
    top = min(top, logprobs.shape[-1])
    if top <= 0:
        return [], []
    found = torch.topk(logprobs, top)
    values: list[float] = found.values.tolist()
    ids: list[int] = found.indices.tolist()
    return values, ids


def raw(logits: torch.Tensor) -> torch.Tensor:
    """The model's log-probabilities for logits (last dimension: the vocabulary)."""
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def prompt_logprobs(
    model: Any,
    device: torch.device,
    cache_arg: str,
    prompt_ids: Sequence[int],
    top: int,
    text: TokenText,
) -> list[Logprob | None]:
    """One entry per prompt token: None for the first (nothing predicts it), then each
    token's log-probability given the tokens before it, with ``top`` alternatives.

    The prompt goes through ``model`` alone (no other row's padding can touch it), in
    chunks of at most :data:`PROMPT_CHUNK` positions and :data:`CHUNK_LOGITS` logits;
    each chunk's KV cache is the next one's past. The cache is dropped on return.
    """
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    length = ids.shape[1]
    entries: list[Logprob | None] = [None]
    cache: Any = None
    start = 0
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    chunk = max(1, min(PROMPT_CHUNK, CHUNK_LOGITS // vocab))
    while start < length - 1:  # the last position predicts no prompt token
        end = min(start + chunk, length - 1)
        kwargs: dict[str, Any] = {
            "input_ids": ids[:, start:end],
            "position_ids": torch.arange(start, end, device=device).unsqueeze(0),
            "attention_mask": torch.ones((1, end), dtype=torch.long, device=device),
            "use_cache": True,
        }
        if cache is not None:
            kwargs[cache_arg] = cache
        out = model(**kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        logprobs = raw(out.logits[0])  # [positions, vocab]
        del out
        targets = ids[0, start + 1 : end + 1]
        chosen: list[float] = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        tops = torch.topk(logprobs, min(top, logprobs.shape[-1])) if top > 0 else None
        top_values: list[list[float]] = tops.values.tolist() if tops is not None else []
        top_ids: list[list[int]] = tops.indices.tolist() if tops is not None else []
        for j, token in enumerate(targets.tolist()):
            alternatives = (
                [Logprob(i, text(i), v) for i, v in zip(top_ids[j], top_values[j], strict=True)]
                if tops is not None
                else []
            )
            entries.append(Logprob(token, text(token), chosen[j], alternatives))
        del logprobs, tops
        start = end
    del cache
    return entries
