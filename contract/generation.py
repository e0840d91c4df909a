"""One call into a loaded model: what is asked, how it is stopped, what comes back.

Built per request on the event loop and read on the instance thread (or on the loop,
for inline models and engines that batch by themselves), so the hot types are
slotted, mutable dataclasses: frozen ones cost four times as much to build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


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


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings, already validated by the API layer; read-only
    for backends (not frozen only because frozen dataclasses are slow to build)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()


@dataclass(slots=True)
class GenerationResult:
    """The outcome of one generated sequence; nothing changes it once built."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"


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


@dataclass(slots=True, eq=False)  # an identity: batches track sequences in lists and sets
class Generation:
    """One sequence to generate: its prompt, how to sample it, where its text goes and
    the flag that stops it. The one argument of every ``generate`` on the way down, so
    a new per-request setting is added here once, not to each signature."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    on_text: TextSink | None = None
    cancellation: Cancellation = field(default_factory=Cancellation)
