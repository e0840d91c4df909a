"""One call into a loaded model: what is asked, how it is stopped, what comes back.

Built per request on the event loop and read on the instance thread (or on the loop,
for inline models and engines that batch by themselves), so the hot types are
slotted, mutable dataclasses: frozen ones cost four times as much to build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final


class Task(StrEnum):
    """What a loaded model can do; decides which endpoints accept it."""

    GENERATE = "generate"
    EMBED = "embed"


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that request handling depends on."""

    task: Task
    context_length: int
    device: str
    dtype: str
    has_chat_template: bool = False
    vocab_size: int = 0  # token ids in prompts must be below this; 0 when unknown
    # True when every request-path call (encode_prompt, encode_chat, generate_batch,
    # embed) returns in microseconds without blocking or computing: routerd then makes
    # them on the event loop instead of the instance thread, which saves two thread
    # hops per request. Loading, warm-up, measuring and unloading always use the thread.
    inline: bool = False
    # Tokens the instance's reserved KV cache holds across all its rows at once, counted
    # as a padded batch holds them: rows × the longest row's prompt + max_tokens. The
    # batcher admits rows only while the batch fits it, so a batch never outgrows the
    # bytes the ledger reserved for it. 0: the backend bounds its own cache (an engine
    # that pages it, or a model with none).
    kv_tokens: int = 0
    # ``SamplingParams`` fields this model cannot honour (by field name): serving refuses
    # a request that sets one to anything but its default with a 400 naming it, rather
    # than accept it and answer as if it were not there.
    refuses: frozenset[str] = frozenset()


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings, already validated by the API layer; read-only
    for backends (not frozen only because frozen dataclasses are slow to build).

    The names and meanings are vLLM's, so its engine takes them as they are. Every field
    but ``max_tokens`` defaults to "not asked for" (``DEFAULTS``); a backend that cannot
    honour one names it in ``ModelInfo.refuses``.

    - ``temperature`` 0 is greedy decoding; ``top_p``, ``top_k`` (0: no limit) and
      ``min_p`` (tokens below ``min_p`` × the top token's probability are dropped) cut
      the distribution before sampling.
    - ``presence_penalty`` / ``frequency_penalty`` lower the logits of tokens already
      generated (once / per occurrence); ``repetition_penalty`` divides positive and
      multiplies negative logits of tokens in the prompt or the output (1: none).
    - ``logit_bias`` adds to the logits of token ids; ``allowed_token_ids`` keeps only
      those ids (None: all).
    - ``ignore_eos``: the end-of-sequence token does not end the row; ``min_tokens``:
      neither it nor ``stop_token_ids`` can be generated before this many tokens.
    - ``stop`` strings end the row, cut from the text unless
      ``include_stop_str_in_output``; ``stop_token_ids`` end it on those tokens.
    - ``logprobs``: None for none, else the log-probabilities of each generated token
      with this many most likely alternatives (0: the chosen token's only);
      ``prompt_logprobs`` the same for the prompt's tokens. Values are the model's
      log-softmax, before temperature, penalties or any other change to the logits.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | None = None
    allowed_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Sequence[int] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def copy(self) -> SamplingParams:
        """A copy to change (each prompt and choice gets its own ``max_tokens`` and
        ``seed``): built field by field, ten times faster than ``copy.copy``."""
        return SamplingParams(
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.seed,
            self.stop,
            self.top_k,
            self.min_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
            self.logit_bias,
            self.allowed_token_ids,
            self.ignore_eos,
            self.min_tokens,
            self.stop_token_ids,
            self.include_stop_str_in_output,
            self.logprobs,
            self.prompt_logprobs,
        )


DEFAULTS: Final = SamplingParams(max_tokens=1)
"""Every field's "not asked for" value (``max_tokens`` aside)."""
_FIELD_ORDER: Final = {name: i for i, name in enumerate(SamplingParams.__slots__)}


def asked_fields(params: SamplingParams, among: Iterable[str] | None = None) -> list[str]:
    """The names of ``params``' fields (of ``among``, else all) set to something other
    than their default, ``max_tokens`` aside, in the order the fields are declared."""
    names = SamplingParams.__slots__ if among is None else among
    asked = [
        name
        for name in names
        if name != "max_tokens" and getattr(params, name) != getattr(DEFAULTS, name)
    ]
    if among is not None:
        asked.sort(key=_FIELD_ORDER.__getitem__)
    return asked


def shapes_logits(params: SamplingParams) -> bool:
    """Whether a row needs more than temperature and top-p applied to its logits."""
    return (
        params.top_k > 0
        or params.min_p > 0.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
        or params.repetition_penalty != 1.0
        or bool(params.logit_bias)
        or params.allowed_token_ids is not None
        or params.min_tokens > 0
    )


@dataclass(slots=True)
class Logprob:
    """One token's log-probability, and at a generated position its alternatives.

    ``token`` is the token's own text, decoded alone (a token that holds part of a
    character decodes to U+FFFD). ``top``: the most likely tokens at that position,
    most likely first, as many as asked (the chosen token among them if it is one).
    """

    token_id: int
    token: str
    logprob: float
    top: list[Logprob] = field(default_factory=list)


@dataclass(slots=True)
class GenerationResult:
    """The outcome of one generated sequence; nothing changes it once built."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    # One per generated token when ``SamplingParams.logprobs`` asked for them (the tokens
    # of a stop string and the end-of-sequence token included), else None.
    logprobs: list[Logprob] | None = None
    # One per prompt token when ``prompt_logprobs`` asked for them; the first is None
    # (nothing precedes it to predict it).
    prompt_logprobs: list[Logprob | None] | None = None


@dataclass(eq=False)  # compared and hashed by identity: instances track live ones in sets
class Cancellation:
    """Set from the event loop when a client goes away; polled between steps.

    A plain flag: assigning an attribute is atomic, and the executor thread only
    polls it, never waits on it (a ``threading.Event`` would cost a lock and a
    condition per request for nothing).
    """

    cancelled: bool = False
    # Called once by ``cancel`` on the event loop: an async backend sets it to stop its
    # request at once instead of at the next poll.
    on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        self.cancelled = True
        if self.on_cancel is not None:
            hook, self.on_cancel = self.on_cancel, None
            hook()


TextSink = Callable[[str], None]
"""Receives each new piece of generated text, in order (on the instance thread, or on
the event loop for a model that generates there)."""

LogprobSink = Callable[[Logprob], None]
"""Receives each generated token's ``Logprob`` when a streamed row asked for logprobs,
on the same thread as its ``TextSink`` and before any text that token produced."""


@dataclass(slots=True, eq=False)  # an identity: batches track sequences in lists and sets
class Generation:
    """One sequence to generate: its prompt, how to sample it, where its text goes and
    the flag that stops it. The one argument of every ``generate`` on the way down, so
    a new per-request setting is added here once, not to each signature."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    on_text: TextSink | None = None
    cancellation: Cancellation = field(default_factory=Cancellation)
    on_logprob: LogprobSink | None = None
