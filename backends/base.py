"""The contract between the scheduler and the code that runs models.

A *backend* turns a registered model version (a folder plus options) into a
*loaded model*. The scheduler owns residency (DESIGN.md rule 1): it decides when a
backend loads or unloads, and it calls every blocking method below from the
instance's own executor thread (rule 6), never from the event loop. Backends
therefore may block freely, but must not keep state between instances and must
not touch the scheduler.

Who calls what, and when:

- ``Backend.validate_options`` — the registry, when a version is registered or
  synced from config, so a bad option is refused before anything is stored.
- ``Backend.task_of`` — the scheduler (``Scheduler.task_of``), off the event loop, when
  a request for a version with no loaded instance asks what it does, before any lease
  or load: serving refuses an endpoint the version cannot serve without loading it.
  The answer is kept per version; once an instance is loaded, its ``info.task`` wins.
- ``Backend.load`` — the scheduler, once per instance, in the instance executor.
- ``LoadedModel.warm_up`` — the scheduler, right after ``load``, before the
  instance accepts its first lease.
- ``Backend.estimate_footprint`` — the scheduler, before placing a version, off the
  event loop; reads headers only. Its total is claimed where the version was never
  measured on that kind of device; its minimum bounds every claim from below.
- ``LoadedModel.measure_footprint`` — the scheduler, after warm-up, to record what
  the instance really occupies and needed to start; later placements use that number
  (rule 5), raised to the estimate's minimum where it is less.
- ``encode_prompt`` / ``encode_chat`` — request handlers, off the event loop,
  before generation, so prompt-length errors are answered before streaming starts.
- ``generate`` / ``generate_batch`` / ``embed`` — the instance's batcher, for requests
  that hold a lease, in the instance executor.
- ``generate_async`` / ``embed_async`` (``AsyncGenerating`` / ``AsyncEmbedding``, models
  whose engine batches by itself) — the instance's batcher, on the event loop, instead
  of ``generate_batch`` / ``embed``.
- ``offload`` / ``restore`` (``Offloadable``) — the scheduler, in the instance
  executor, when an evicted instance goes to the host-RAM tier and when it comes back.
- ``unload`` — the scheduler, in the instance executor, when the instance leaves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from contract.errors import BackendError
from contract.generation import Generation, GenerationResult, ModelInfo, Task


@dataclass(frozen=True)
class LoadProgress:
    """Where a load stands, for operators watching it (``routerctl load``, SSE comments).

    ``phase`` is one of ``PHASES``; ``done_bytes`` of ``total_bytes`` of it are done
    (both 0 when the phase has no byte count).
    """

    phase: str
    done_bytes: int = 0
    total_bytes: int = 0


READING_WEIGHTS = "reading weights"
MOVING_TO_DEVICE = "moving to device"
WARMING_UP = "warm-up"
PHASES = (READING_WEIGHTS, MOVING_TO_DEVICE, WARMING_UP)

ProgressSink = Callable[[LoadProgress], None]
"""Receives load progress on the instance thread; must return at once."""


@dataclass(frozen=True)
class LoadSpec:
    """Everything a backend needs to load one version; built from the registry.

    ``progress``, when given, is told each phase of ``load`` as it goes (optional:
    a backend that never calls it is still correct; the scheduler reports warm-up).
    """

    name: str
    version: str
    path: str
    options: Mapping[str, Any]
    device: str  # "cpu" or "cuda:N", already resolved by placement
    progress: ProgressSink | None = None
    # Bytes the scheduler granted this instance on ``device`` (0: not placed, e.g. a
    # direct load in a test). A backend that sizes its own pools (vLLM's KV cache) fits
    # them into the grant instead of taking a share of the whole device.
    grant_bytes: int = 0
    # The batch limits the instance's batcher will keep to (its batching policy's
    # ``max_rows`` and ``max_tokens``; 0 tokens: no token limit). A backend that keeps a
    # KV cache sizes it for them (README: concurrency, batch limits and reserved memory).
    batch_rows: int = 1
    batch_tokens: int = 0
    # What this version was measured to hold on this kind of device, under the same
    # estimate (so the same options, batch limits and context), when it was loaded
    # before; None for a first load or when the operator asked for a new profile. A
    # backend that can trust it skips its profile: warm-up is one tiny real request.
    known: Footprint | None = None

    def report(self, phase: str, done_bytes: int = 0, total_bytes: int = 0) -> None:
        if self.progress is not None:
            self.progress(LoadProgress(phase, done_bytes, total_bytes))


@dataclass(slots=True, eq=False)  # rows are identities: a batch tracks them in lists and sets
class GenerationRow(Generation):
    """One sequence of a batch: a generation and what becomes of it.

    ``on_text`` and ``on_done`` are called on the executor thread; ``on_done`` exactly
    once, when the row finishes (stop, length or cancelled) or fails (``error`` set,
    ``result`` None) — other rows of the batch carry on either way.
    """

    on_done: Callable[[GenerationRow], None] = field(kw_only=True)
    result: GenerationResult | None = field(default=None, kw_only=True)
    error: BaseException | None = field(default=None, kw_only=True)

    @classmethod
    def of(cls, generation: Generation, on_done: Callable[[GenerationRow], None]) -> GenerationRow:
        """A row for ``generation`` whose end is told to ``on_done``."""
        return cls(
            list(generation.prompt_ids),
            generation.params,
            generation.on_text,
            generation.cancellation,
            generation.on_logprob,
            on_done=on_done,
        )

    def outcome(self) -> GenerationResult:
        """The result of the finished row, or its error raised.

        Raises BackendError for a row the backend returned without finishing, which the
        protocol rules out: a caller never gets None for a result.
        """
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise BackendError("the backend's generate_batch left a row unfinished")
        return self.result


RowSource = Callable[[int], list[GenerationRow]]
"""Called by ``generate_batch`` between decode steps with the number of free slots;
returns the queued rows that join the running batch now (possibly none)."""

_UNBOUNDED_ROWS = 1 << 30  # free slots when a batch has no maximum


def free_slots(max_rows: int | None, running: int) -> int:
    """Rows ``admit`` may add to a batch of ``running`` rows capped at ``max_rows``
    (None: no cap); 0 or less when the batch is full."""
    return (_UNBOUNDED_ROWS if max_rows is None else max_rows) - running


def generate_alone(
    generate_batch: Callable[[Sequence[GenerationRow], RowSource | None], None],
    generation: Generation,
) -> GenerationResult:
    """``LoadedModel.generate`` for a backend whose batch loop is its only decode path:
    one row through ``generate_batch`` with nothing admitted, so the two cannot differ."""
    row = GenerationRow.of(generation, _ignore_done)
    generate_batch([row], None)
    return row.outcome()


def _ignore_done(row: GenerationRow) -> None:
    """``on_done`` of a row whose caller reads it when ``generate_batch`` returns."""


@dataclass(frozen=True)
class Footprint:
    """Device bytes an instance needs, split by what they are for.

    ``weights``: parameters and buffers in the target dtype. ``runtime``: the KV
    cache the instance is granted (context length × max concurrent sequences × bytes
    per token), reserved whether or not it is in use yet. ``working``: activations
    and scratch memory of a forward pass. Estimates and measurements use the same
    split, so they can be compared term by term.

    ``minimum``: the fewest bytes the backend can start the instance in, whatever it
    then turns out to hold (0: nothing beyond what is measured). vLLM refuses a grant
    without room for its weights, its overhead and a KV cache; its engine may then
    hold less than that overhead. An estimate's minimum is what any load needs (vLLM:
    one sequence's KV cache), a measurement's what this instance needed (its own KV
    cache). The scheduler never grants less than the estimate's, and it learns
    ``needed()`` of a measurement, not the bytes held alone.
    """

    weights: int
    runtime: int = 0
    working: int = 0
    minimum: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.runtime + self.working

    def needed(self) -> Footprint:
        """This footprint with ``working`` raised until the total covers ``minimum``:
        what a later load of the same version must be granted to start as this one did."""
        short = self.minimum - self.total
        return self if short <= 0 else replace(self, working=self.working + short)


class LoadedModel(Protocol):
    """One model resident on one device. Every method may block."""

    @property
    def info(self) -> ModelInfo: ...

    def warm_up(self) -> None:
        """Run real requests so the first client does not pay for lazy set-up, and
        profile them (a full-context prompt included) so ``measure_footprint`` can
        report what the instance really needs."""

    def measure_footprint(self) -> Footprint:
        """What this instance really holds on its device, measured after warm-up; its
        ``minimum`` is what it needed to start, where that is more than it holds."""

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize a raw prompt as the model expects it (special tokens included)."""

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Render messages with the model's chat template and tokenize them.

        Raises InvalidRequest when the model has no chat template or the messages
        do not fit it.
        """

    def generate(self, generation: Generation) -> GenerationResult:
        """Decode until a stop condition; stream text through ``on_text`` if given.

        Text passed to ``on_text`` is never taken back: it never holds a stop string
        that the result cuts, nor the beginning of one that might still complete and be
        cut (``include_stop_str_in_output`` keeps them). Concatenating every piece gives
        exactly ``GenerationResult.text``.
        """

    def generate_batch(
        self, rows: Sequence[GenerationRow], admit: RowSource | None, max_rows: int | None = None
    ) -> None:
        """Decode ``rows`` together until every row has finished.

        Each row keeps its own ``SamplingParams`` (every field not in
        ``ModelInfo.refuses`` honoured), streams through its own ``on_text`` (and
        ``on_logprob``, when it asked for logprobs) and finishes on its own; a row whose
        cancellation is set stops alone. A row's greedy output is the same as from
        ``generate`` alone. Between steps, ``admit`` (if given) is asked for rows to
        join the running batch; a backend that cannot join rows mid-decode calls it
        only when the batch is empty and returns when admit has nothing more.
        ``max_rows`` caps the batch: admit is offered ``max_rows`` minus the rows running.
        """

    def count_tokens(self, text: str) -> int:
        """Tokens the model's tokenizer gives for ``text`` (usage reporting)."""

    def decode_tokens(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` as the model's tokenizer decodes them, special
        tokens left out (a completion's ``echo`` of a prompt given as token ids)."""

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """One normalized vector per tokenized input, computed in one pass."""

    def unload(self) -> None:
        """Drop every reference to device memory; the instance is gone after this."""


@runtime_checkable
class AsyncGenerating(Protocol):
    """A loaded model that schedules requests itself (vLLM's continuous batching).

    Its ``generate_async`` runs on the event loop: the batcher hands each request
    straight to it instead of queueing rows for ``generate_batch`` on the instance
    thread. ``on_text`` is then called on the loop. Cancellation ends the request at
    the engine (``Cancellation.on_cancel``), and cancelling the awaiting task does too.
    """

    async def generate_async(self, generation: Generation) -> GenerationResult: ...


@runtime_checkable
class AsyncEmbedding(Protocol):
    """A loaded model whose engine batches embedding requests itself (vLLM's pooling runner).

    ``Batcher.embed`` tokenizes a request's inputs on the instance thread as usual, then
    awaits ``embed_async`` on the event loop instead of queueing a job for ``embed``:
    concurrent requests meet in the engine's own batches, not in routerd's batch loop.
    Returns one vector per input, as the model's pooler makes it (normalized for an
    embedding pooler). Cancelling the awaiting task ends the requests at the engine.
    """

    async def embed_async(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]: ...


@runtime_checkable
class Sleepable(Protocol):
    """A loaded model that can give its device memory back without shutting down.

    ``sleep`` moves the weights to host RAM and drops the KV cache (vLLM's level 1);
    ``wake_up`` brings them back, much faster than a load. Both run on the event loop.
    While asleep, the scheduler counts ``Footprint.weights`` against its host-RAM tier
    (``[devices] host_cache``) and only ``Footprint.working`` against the device.
    """

    @property
    def can_sleep(self) -> bool: ...

    async def sleep(self) -> None: ...

    async def wake_up(self) -> None: ...


@runtime_checkable
class Offloadable(Protocol):
    """A loaded model that can leave its device for routerd's host-RAM tier and come back
    without reading its checkpoint or warming up again.

    ``offload`` — the scheduler, on the instance thread, once the instance is drained
    and idle: keep the weights in host memory (on a GPU, copied to pinned host memory;
    on the CPU they already are host memory and stay as they are), give back everything
    else (caches, working memory, allocator pools). ``restore`` — the scheduler, on the
    instance thread, when a request wants it back: the same weights onto the device
    (non-blocking copies from pinned memory on a GPU). Meanwhile the scheduler counts
    ``Footprint.weights`` against the tier and nothing against the device.
    ``can_offload``: whether this model and device allow it (read before offloading).
    """

    @property
    def can_offload(self) -> bool: ...

    def offload(self) -> None: ...

    def restore(self) -> None: ...


class Backend(Protocol):
    """A kind of model runtime (``transformers``, later ``vllm``, ``echo``…)."""

    kind: str

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return the options normalized, or raise InvalidRequest naming the bad key."""

    def task_of(self, path: str, options: Mapping[str, Any]) -> Task | None:
        """What a version in folder ``path`` with (backend) ``options`` will do once
        loaded, from its options and small files alone (config.json; never weights), or
        None where only a load can tell. It must agree with the ``ModelInfo.task`` that
        ``load`` gives: a wrong answer refuses requests the model would serve.

        Raises BackendError when the folder cannot be read (the caller then takes the
        answer as unknown, and the load reports the error).
        """

    def estimate_footprint(self, spec: LoadSpec) -> Footprint:
        """Bytes ``spec`` will need on ``spec.device``, from headers alone (no weights read).

        ``Footprint.minimum`` says what a load cannot start without; the scheduler
        grants at least that even where a stored measurement says less.

        Raises BackendError when the folder cannot be read.
        """

    def load(self, spec: LoadSpec) -> LoadedModel:
        """Read the folder and place the model on ``spec.device``; may take seconds."""
