"""Validated requests, as serving takes them: the HTTP layer parses JSON into these
(``routerd.api.schemas``); nothing below HTTP sees a request body.
"""

from __future__ import annotations

from dataclasses import dataclass

Prompt = str | list[int]

# The parsed requests below are plain (slotted) dataclasses, not frozen ones: one or
# two are built for every request, and a frozen dataclass costs about four times as
# much to build (each field is set through ``object.__setattr__``). Nothing changes
# them once parsed.


@dataclass(slots=True)
class SamplingFields:
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


@dataclass(slots=True)
class GenerationRequest:
    """What completions and chat requests share: the model, sampling, streaming."""

    model: str
    sampling: SamplingFields
    stream: bool
    include_usage: bool
    user: str | None
    keep_alive: float | None


@dataclass(slots=True)
class CompletionRequest(GenerationRequest):
    prompts: list[Prompt]


@dataclass(slots=True)
class ChatRequest(GenerationRequest):
    messages: list[dict[str, str]]


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[Prompt]
    encoding_format: str
    user: str | None
    keep_alive: float | None
