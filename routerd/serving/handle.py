"""What serving may do with a leased model: the ``ModelHandle`` protocol.

The scheduler's lease hands one out (``Lease.handle``, implemented over an instance
by ``routerd.instance_handle``). Everything behind it — the instance, its thread,
its batcher, the loaded model — stays behind it, so serving and the HTTP layer
cannot reach past a lease into what the scheduler owns.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from contract.generation import GenerationResult, Logprob, ModelInfo, SamplingParams


class Tokenizer(Protocol):
    """A model as an embedding request's preparation sees it, on the model's thread."""

    @property
    def info(self) -> ModelInfo: ...

    def encode_prompt(self, text: str) -> list[int]: ...


PrepareInputs = Callable[[Tokenizer], list[list[int]]]
"""Turns one embedding request's inputs into checked token ids; runs on the model's
thread inside the embedding batch, and raises to fail that request alone."""


@dataclass(frozen=True)
class Finished:
    """The last item of a stream: the whole result with its usage and finish reason."""

    result: GenerationResult


@dataclass(frozen=True)
class Embedding:
    """One embedding request's outcome: its token ids and one vector per input."""

    token_ids: list[list[int]]
    vectors: list[list[float]]


class ModelHandle(Protocol):
    """A leased model, valid while its lease is held (streaming included)."""

    @property
    def info(self) -> ModelInfo:
        """What the model is: its task, context length, vocabulary."""
        ...

    @property
    def device(self) -> str:
        """Where it runs: ``cpu`` or ``cuda:N``."""
        ...

    @property
    def max_tokens(self) -> int | None:
        """The version's cap on completion tokens per request, if it sets one."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """Token ids for a text prompt (on the model's own thread)."""
        ...

    async def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of chat messages rendered with the model's template."""
        ...

    async def decode_tokens(self, token_ids: Sequence[int]) -> str:
        """The text of token ids, special tokens left out (on the model's own thread)."""
        ...

    async def generate(self, token_ids: list[int], params: SamplingParams) -> GenerationResult:
        """The whole completion of one prompt."""
        ...

    def stream(
        self, token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[str | Logprob | Finished, None]:
        """Text pieces as the model produces them, then ``Finished``; closing the
        generator early stops the work before the lease can be released. When
        ``params.logprobs`` asks for them, each token's ``Logprob`` comes before the
        text that token produced."""
        ...

    async def embed(self, prepare: PrepareInputs, tokens: int) -> Embedding:
        """Vectors for what ``prepare`` yields; ``tokens`` estimates its size."""
        ...
