"""Between routerd's sampling settings and vLLM's: a request's ``SamplingParams`` as the
arguments of vLLM's, and vLLM's outputs (text, token ids, log-probabilities) read back
into the contract's shapes.

Nothing here imports vLLM: its outputs are read through the protocols below, so the
mapping and the conversion are tested with hand-built objects, without an engine.

Log-probabilities: the engine is started with ``logprobs_mode = "raw_logprobs"``
(``ENGINE_ARGS``), so vLLM's sampler takes them from the model's logits before
temperature, penalties, logit bias or any other processing, as the contract asks.
For each position vLLM returns a dict token id → (logprob, rank, decoded token) that
holds the ``N`` most likely tokens and the chosen one (added even when it ranks below
them). The chosen token's entry becomes the contract's ``Logprob``; its ``top`` lists
the ``N`` most likely, most likely first. Token texts are decoded here, each token
alone with special tokens kept: vLLM's ``decoded_token`` joins partial characters with
the tokens before them, which the contract does not want.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

from contract.errors import BackendError
from contract.generation import GenerationResult, Logprob, LogprobSink, SamplingParams, TextSink

MAX_LOGPROBS: Final = 20
"""The most alternatives per token routerd asks for (its API allows 0–20)."""

ENGINE_ARGS: Final[Mapping[str, Any]] = {
    # Values straight from the model's log-softmax, before any logits processing.
    "logprobs_mode": "raw_logprobs",
    # vLLM refuses a request asking for more (its default is 20 today; stated here so
    # that a change of default cannot refuse what routerd allows).
    "max_logprobs": MAX_LOGPROBS,
}
"""What the engine needs to answer logprobs as the contract defines them."""


class VllmLogprob(Protocol):
    """One entry of vLLM's per-position dict (``vllm.logprobs.Logprob``)."""

    @property
    def logprob(self) -> float: ...

    @property
    def rank(self) -> int | None: ...


Position = Mapping[int, VllmLogprob]
"""vLLM's log-probabilities at one position: token id → its entry."""


class VllmCompletion(Protocol):
    """What is read of ``vllm.CompletionOutput`` (one delta of a streamed request)."""

    @property
    def text(self) -> str: ...

    @property
    def token_ids(self) -> Sequence[int]: ...

    @property
    def logprobs(self) -> Sequence[Position] | None: ...

    @property
    def finish_reason(self) -> str | None: ...


class VllmOutput(Protocol):
    """What is read of ``vllm.RequestOutput``."""

    @property
    def prompt_logprobs(self) -> Sequence[Position | None] | None: ...

    @property
    def outputs(self) -> Sequence[VllmCompletion]: ...


# -- the request ----------------------------------------------------------------------


def drops_output(params: SamplingParams) -> bool:
    """Whether the row asks for no tokens at all (``max_tokens`` 0, as a completion that
    echoes its prompt with its logprobs does): vLLM generates at least one, so one is
    asked for and dropped."""
    return params.max_tokens <= 0


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """The arguments of ``vllm.SamplingParams`` for ``params`` (``output_kind`` aside).

    The names and meanings are vLLM's already; what differs: one sequence per request
    (routerd asks for ``n`` choices itself), ``top_k`` 0 is "no limit" in both, empty
    sequences become None, and ``max_tokens`` 0 asks for one token (dropped, see
    ``drops_output``) without logprobs.
    """
    dropped = drops_output(params)
    return {
        "n": 1,
        "max_tokens": 1 if dropped else params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": (
            {int(k): float(v) for k, v in params.logit_bias.items()} if params.logit_bias else None
        ),
        "allowed_token_ids": (
            None if params.allowed_token_ids is None else [int(i) for i in params.allowed_token_ids]
        ),
        "ignore_eos": params.ignore_eos,
        "min_tokens": params.min_tokens,
        "stop": list(params.stop) or None,
        "stop_token_ids": [int(i) for i in params.stop_token_ids] or None,
        "include_stop_str_in_output": params.include_stop_str_in_output,
        "seed": params.seed,
        "logprobs": None if dropped else params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
        "skip_special_tokens": True,
    }


# -- log-probabilities -------------------------------------------------------------------


def _rank(entry: VllmLogprob) -> float:
    return math.inf if entry.rank is None else entry.rank


def position_logprob(
    chosen: int, entries: Position, top_n: int, text: Callable[[int], str]
) -> Logprob:
    """The contract's entry for token ``chosen`` from vLLM's dict at its position, with
    the ``top_n`` most likely tokens (by vLLM's rank) as its ``top``.

    The chosen token is among them only when it ranks within ``top_n``: vLLM adds it to
    the dict even when it ranks below (and a tie with the last one may leave ``top_n`` + 1
    entries of rank ≤ ``top_n``; the first ``top_n`` by rank and value are kept).
    """
    own = entries.get(chosen)
    if own is None:
        raise BackendError(f"vLLM returned no log-probability for the chosen token {chosen}")
    ranked = sorted(
        (
            (_rank(entry), -float(entry.logprob), token_id)
            for token_id, entry in entries.items()
            if _rank(entry) <= top_n
        )
    )[:top_n]
    top = [Logprob(token_id, text(token_id), -negated) for _, negated, token_id in ranked]
    return Logprob(chosen, text(chosen), float(own.logprob), top)


def sample_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[Position] | None,
    top_n: int,
    text: Callable[[int], str],
) -> list[Logprob]:
    """One entry per generated token (vLLM gives one dict per new token id)."""
    if not token_ids:
        return []
    if positions is None or len(positions) != len(token_ids):
        got = "none" if positions is None else str(len(positions))
        raise BackendError(
            f"vLLM returned {got} log-probability positions for {len(token_ids)} tokens"
        )
    return [
        position_logprob(int(token_id), entries, top_n, text)
        for token_id, entries in zip(token_ids, positions, strict=True)
    ]


def prompt_logprobs(
    prompt_ids: Sequence[int],
    positions: Sequence[Position | None],
    top_n: int,
    text: Callable[[int], str],
) -> list[Logprob | None]:
    """One entry per prompt token, the first None (nothing precedes it to predict it)."""
    if len(positions) != len(prompt_ids):
        raise BackendError(
            f"vLLM returned {len(positions)} prompt log-probability positions "
            f"for {len(prompt_ids)} prompt tokens"
        )
    converted: list[Logprob | None] = [None]
    for token_id, entries in zip(prompt_ids[1:], positions[1:], strict=True):
        if entries is None:
            raise BackendError(f"vLLM returned no prompt log-probability for token {token_id}")
        converted.append(position_logprob(int(token_id), entries, top_n, text))
    return converted


# -- reading a streamed request ------------------------------------------------------------


class OutputReader:
    """Reads one request's stream of vLLM deltas (``RequestOutputKind.DELTA``) into a
    ``GenerationResult``, streaming as it goes: each new token's ``Logprob`` goes to
    ``on_logprob`` before the text that came with it goes to ``on_text``.

    For a row that asked for no tokens (``drops_output``) the one token vLLM generated
    is dropped: no text, no tokens, finish "length"; only the prompt's logprobs are kept.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        text: Callable[[int], str],
        on_text: TextSink | None = None,
        on_logprob: LogprobSink | None = None,
    ) -> None:
        self._params = params
        self._prompt_ids = prompt_ids
        self._text = text
        self._on_text = on_text
        self._on_logprob = on_logprob
        self._dropping = drops_output(params)
        self._pieces: list[str] = []
        self._tokens = 0
        self._finish = "length"
        self._logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self._prompt_logprobs: list[Logprob | None] | None = None

    def take(self, output: VllmOutput) -> None:
        """One delta: its prompt logprobs (the first delta), tokens, text, finish."""
        asked_prompt = self._params.prompt_logprobs
        if asked_prompt is not None and output.prompt_logprobs:
            self._prompt_logprobs = prompt_logprobs(
                self._prompt_ids, output.prompt_logprobs, asked_prompt, self._text
            )
        completion = output.outputs[0]
        if completion.finish_reason is not None:
            self._finish = _finish(completion.finish_reason)
        if self._dropping:
            return
        self._tokens += len(completion.token_ids)
        top_n = self._params.logprobs
        if self._logprobs is not None and top_n is not None:
            entries = sample_logprobs(completion.token_ids, completion.logprobs, top_n, self._text)
            self._logprobs.extend(entries)
            if self._on_logprob is not None:
                for entry in entries:
                    self._on_logprob(entry)
        if completion.text:
            self._pieces.append(completion.text)
            if self._on_text is not None:
                self._on_text(completion.text)

    def cancelled(self) -> None:
        """The request was stopped before vLLM finished it."""
        self._finish = "cancelled"

    def result(self) -> GenerationResult:
        finish = "length" if self._dropping and self._finish != "cancelled" else self._finish
        return GenerationResult(
            text="".join(self._pieces),
            prompt_tokens=len(self._prompt_ids),
            completion_tokens=self._tokens,
            finish_reason=finish,
            logprobs=self._logprobs,
            prompt_logprobs=self._prompt_logprobs,
        )


def _finish(reason: str) -> str:
    """vLLM's finish reason as routerd's: "abort" is a cancelled row, "length" ran out
    of ``max_tokens``, anything else ("stop": end of sequence, a stop string or id) stopped."""
    if reason == "abort":
        return "cancelled"
    return "length" if reason == "length" else "stop"
