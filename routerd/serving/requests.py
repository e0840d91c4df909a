"""Validated requests, as serving takes them: the HTTP layer parses JSON into these
(``routerd.api.schemas``); nothing below HTTP sees a request body.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.generation import SamplingParams

Prompt = str | list[int]

# The parsed requests below are plain (slotted) dataclasses, not frozen ones: one or
# two are built for every request, and a frozen dataclass costs about four times as
# much to build (each field is set through ``object.__setattr__``). Nothing changes
# them once parsed.


@dataclass(slots=True)
class SamplingFields:
    """How to decode each choice: ``params`` with ``max_tokens`` as asked (None: as many
    as the context leaves); serving fits it to each prompt (``fit_to_context``)."""

    max_tokens: int | None
    params: SamplingParams
    plain: bool = False  # every field at its default: no backend can refuse anything


@dataclass(slots=True)
class GenerationRequest:
    """What completions and chat requests share: the model, sampling, streaming.

    ``logprobs``: alternatives per generated token the client asked for (None: no
    logprobs; ``params.logprobs`` may ask the model for more, e.g. for ``best_of``).
    ``prompt_logprobs``: vLLM's field, answered in vLLM's shape. ``ignored``: fields
    outside OpenAI's and vLLM's schemas, ignored but named in the response.
    """

    model: str
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    user: str | None  # the sticky routing key
    keep_alive: float | None
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    tokens_as_ids: bool = False
    truncate_prompt_tokens: int | None = None
    ignored: tuple[str, ...] = ()


@dataclass(slots=True)
class CompletionRequest(GenerationRequest):
    prompts: list[Prompt] = field(default_factory=list)
    echo: bool = False
    best_of: int | None = None


@dataclass(slots=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[Prompt]
    encoding_format: str
    user: str | None
    keep_alive: float | None
    truncate_prompt_tokens: int | None = None
    ignored: tuple[str, ...] = ()
