"""Choices as OpenAI's completions and chat APIs write them, whole or streamed, with
their log-probabilities in each API's shape.

- Chat: ``logprobs.content`` lists each generated token with its ``bytes`` and
  ``top_logprobs``.
- Completions: ``logprobs`` holds parallel lists ``tokens``, ``token_logprobs``,
  ``top_logprobs`` and ``text_offset``; with ``echo`` the prompt's tokens come first,
  the very first with null log-probabilities (nothing precedes it to predict it).
- vLLM's ``prompt_logprobs``: per prompt token a map token id → logprob, rank and
  decoded token (the first null).

JSON has no infinity: a log-probability of -inf (a token masked out) is written as
-9999.0, vLLM's convention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.generation import GenerationResult, Logprob
from routerd.serving.prompts import finish_reason

_FLOOR = -9999.0


def _value(logprob: float) -> float | None:
    if math.isnan(logprob):
        return None
    return logprob if logprob > _FLOOR else _FLOOR


def _name(entry: Logprob, as_ids: bool) -> str:
    return f"token_id:{entry.token_id}" if as_ids else entry.token


@dataclass(slots=True)
class Echo:
    """What ``echo`` puts before a completion: the prompt's text and, when logprobs
    are asked, its tokens' entries (the first with a NaN logprob: it has none)."""

    text: str
    entries: list[Logprob] = field(default_factory=list)


def first_prompt_entry(token_id: int, token: str) -> Logprob:
    """The entry of a prompt's first token, which has no log-probability."""
    return Logprob(token_id, token, math.nan)


# -- chat --------------------------------------------------------------------------


def chat_entry(entry: Logprob, top: int, as_ids: bool) -> dict[str, Any]:
    name = _name(entry, as_ids)
    return {
        "token": name,
        "logprob": _value(entry.logprob),
        "bytes": list(name.encode("utf-8", "replace")),
        "top_logprobs": [
            {
                "token": (alt_name := _name(alt, as_ids)),
                "logprob": _value(alt.logprob),
                "bytes": list(alt_name.encode("utf-8", "replace")),
            }
            for alt in entry.top[:top]
        ],
    }


def chat_logprobs(entries: Sequence[Logprob], top: int, as_ids: bool) -> dict[str, Any]:
    return {"content": [chat_entry(e, top, as_ids) for e in entries], "refusal": None}


# -- completions -------------------------------------------------------------------


def completion_logprobs(
    entries: Sequence[Logprob], top: int, as_ids: bool, offset: int = 0
) -> dict[str, Any]:
    """The legacy ``logprobs`` object; ``offset``: where the first token's text starts
    in the choice's text (a streamed chunk continues its choice's offsets)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float | None] | None] = []
    offsets: list[int] = []
    for entry in entries:
        name = _name(entry, as_ids)
        tokens.append(name)
        values.append(_value(entry.logprob))
        offsets.append(offset)
        offset += len(entry.token)
        if math.isnan(entry.logprob):
            tops.append(None)
            continue
        alternatives = {_name(alt, as_ids): _value(alt.logprob) for alt in entry.top[:top]}
        alternatives.setdefault(name, _value(entry.logprob))  # vLLM lists the chosen one too
        tops.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def vllm_prompt_logprobs(
    entries: Sequence[Logprob | None] | None, top: int, as_ids: bool
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token its own and the top alternatives'."""
    if entries is None:
        return None
    written: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None or math.isnan(entry.logprob):
            written.append(None)
            continue
        ranked = entry.top[:top]
        ranks = {alt.token_id: rank for rank, alt in enumerate(ranked, start=1)}
        items = {
            str(alt.token_id): _prompt_item(alt, ranks.get(alt.token_id), as_ids) for alt in ranked
        }
        items[str(entry.token_id)] = _prompt_item(entry, ranks.get(entry.token_id), as_ids)
        written.append(items)
    return written


def _prompt_item(entry: Logprob, rank: int | None, as_ids: bool) -> dict[str, Any]:
    return {"logprob": _value(entry.logprob), "rank": rank, "decoded_token": _name(entry, as_ids)}


# -- whole choices -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Asked:
    """What a request asked to see of each choice."""

    logprobs: int | None  # alternatives per token; None: no logprobs
    prompt_logprobs: int | None  # vLLM's field
    as_ids: bool  # return_tokens_as_token_ids


def text_choice(
    asked: Asked, index: int, result: GenerationResult, echo: Echo | None
) -> dict[str, Any]:
    text = result.text if echo is None else echo.text + result.text
    logprobs = None
    if asked.logprobs is not None:
        entries = [*(echo.entries if echo else ()), *(result.logprobs or ())]
        logprobs = completion_logprobs(entries, asked.logprobs, asked.as_ids)
    choice: dict[str, Any] = {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason(result),
    }
    if asked.prompt_logprobs is not None:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(
            result.prompt_logprobs, asked.prompt_logprobs, asked.as_ids
        )
    return choice


def message_choice(
    asked: Asked, index: int, result: GenerationResult, echo: Echo | None
) -> dict[str, Any]:
    logprobs = None
    if asked.logprobs is not None:
        logprobs = chat_logprobs(result.logprobs or [], asked.logprobs, asked.as_ids)
    return {
        "index": index,
        "message": {"role": "assistant", "content": result.text},
        "logprobs": logprobs,
        "finish_reason": finish_reason(result),
    }


# -- streamed choices ---------------------------------------------------------------


class StreamedText:
    """One completions choice, streamed: text pieces with the logprobs of their tokens."""

    def __init__(self, asked: Asked, index: int) -> None:
        self._asked = asked
        self._index = index
        self._offset = 0  # of the next token's text within the choice's text

    def piece(self, text: str, entries: Sequence[Logprob], finish: str | None) -> dict[str, Any]:
        logprobs = None
        if self._asked.logprobs is not None:
            logprobs = completion_logprobs(
                entries, self._asked.logprobs, self._asked.as_ids, self._offset
            )
            self._offset += sum(len(e.token) for e in entries)
        return {"index": self._index, "text": text, "logprobs": logprobs, "finish_reason": finish}


class StreamedMessage:
    """One chat choice, streamed: the first delta names the role, a finishing one has no
    content."""

    def __init__(self, asked: Asked, index: int) -> None:
        self._asked = asked
        self._index = index
        self._started = False

    def piece(self, text: str, entries: Sequence[Logprob], finish: str | None) -> dict[str, Any]:
        delta: dict[str, str] = {"content": text} if text or finish is None else {}
        if not self._started:
            delta = {"role": "assistant", **delta}
            self._started = True
        logprobs = None
        if self._asked.logprobs is not None and entries:
            logprobs = chat_logprobs(entries, self._asked.logprobs, self._asked.as_ids)
        return {"index": self._index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
