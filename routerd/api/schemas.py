"""Parsing and validating OpenAI request bodies into typed requests.

The typed requests themselves (``routerd.serving.requests``) sit below HTTP, where
serving takes them; this module is the HTTP side that builds them from JSON.

Every check names the offending field in ``param``, because a client debugging a
400 needs to know which field to fix. Fields routerd does not implement are refused
when set to anything but their neutral value, rather than silently ignored: a
client asking for ``logprobs`` must not believe it got them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from routerd.config import ConfigError, parse_keep_alive
from routerd.errors import BadRequest
from routerd.serving.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    Prompt,
    SamplingFields,
)


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    _refuse_fields(body, COMPLETION_FIELDS, COMPLETION_UNSUPPORTED)
    if body.get("max_completion_tokens") is not None:
        # Chat's field, absent from the legacy completions API: ignoring it would let
        # the client believe its limit held while max_tokens' default applied.
        raise BadRequest(
            "max_completion_tokens is a field of /v1/chat/completions; "
            "/v1/completions takes max_tokens",
            param="max_completion_tokens",
        )
    return CompletionRequest(
        prompts=_prompts(body.get("prompt"), param="prompt"),
        **_generation_fields(body, max_tokens_default=16, max_tokens_keys=("max_tokens",)),
    )


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    _refuse_fields(body, CHAT_FIELDS, CHAT_UNSUPPORTED)
    return ChatRequest(
        messages=_messages(body.get("messages")),
        **_generation_fields(
            body, max_tokens_default=None, max_tokens_keys=("max_completion_tokens", "max_tokens")
        ),
    )


def _generation_fields(
    body: Mapping[str, Any], *, max_tokens_default: int | None, max_tokens_keys: Sequence[str]
) -> dict[str, Any]:
    """What completions and chat read alike: ``GenerationRequest``'s fields."""
    stream, include_usage = _stream_fields(body)
    return {
        "model": _model(body),
        "sampling": _sampling(
            body, max_tokens_default=max_tokens_default, max_tokens_keys=max_tokens_keys
        ),
        "stream": stream,
        "include_usage": include_usage,
        "user": _optional_str(body, "user"),
        "keep_alive": _keep_alive(body),
    }


def parse_embedding(body: Mapping[str, Any]) -> EmbeddingRequest:
    _refuse_unknown(body, EMBEDDING_FIELDS)
    if body.get("dimensions") is not None:
        raise BadRequest("dimensions is not supported by this model", param="dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding is None:
        encoding = "float"
    if encoding not in ("float", "base64"):
        raise BadRequest(
            f"encoding_format must be 'float' or 'base64', got {encoding!r}",
            param="encoding_format",
        )
    return EmbeddingRequest(
        model=_model(body),
        inputs=_prompts(body.get("input"), param="input"),
        encoding_format=encoding,
        user=_optional_str(body, "user"),
        keep_alive=_keep_alive(body),
    )


# -- fields ----------------------------------------------------------------------

# field → the neutral values that mean "not asked for"
COMMON_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
COMPLETION_UNSUPPORTED = {
    **COMMON_UNSUPPORTED,
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
CHAT_UNSUPPORTED = {
    **COMMON_UNSUPPORTED,
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
}

_SAMPLING_KEYS = frozenset(("temperature", "top_p", "seed", "stop"))

# Every field each endpoint reads or refuses by name. Anything else is refused as
# unrecognized (as OpenAI does): a misspelt or newer field would otherwise be accepted
# and silently do nothing.
_GENERATION_FIELDS = {"model", "max_tokens", "n", "stream", "stream_options", "user", "keep_alive"}
_GENERATION_FIELDS |= _SAMPLING_KEYS
COMPLETION_FIELDS: Final = frozenset(
    {"prompt", "max_completion_tokens", *_GENERATION_FIELDS, *COMPLETION_UNSUPPORTED}
)
CHAT_FIELDS: Final = frozenset(
    {"messages", "max_completion_tokens", *_GENERATION_FIELDS, *CHAT_UNSUPPORTED}
)
EMBEDDING_FIELDS: Final = frozenset(
    ("model", "input", "encoding_format", "dimensions", "user", "keep_alive")
)

_MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def _refuse_fields(
    body: Mapping[str, Any], known: frozenset[str], unsupported: Mapping[str, tuple[Any, ...]]
) -> None:
    _refuse_unknown(body, known)
    _refuse_unsupported(body, unsupported)


def _refuse_unknown(body: Mapping[str, Any], fields: frozenset[str]) -> None:
    unknown = body.keys() - fields
    if unknown:
        key = min(unknown)  # the same field named each time
        raise BadRequest(f"Unrecognized request argument supplied: {key}", param=key)


def _refuse_unsupported(body: Mapping[str, Any], fields: Mapping[str, tuple[Any, ...]]) -> None:
    if not fields.keys().isdisjoint(body):  # usually disjoint: one set operation in C
        for key, neutral in fields.items():  # in this order: the same field named each time
            if key in body and not any(_same(body[key], n) for n in neutral):
                raise BadRequest(f"{key} is not supported by routerd yet", param=key)
    if "n" not in body:
        return
    n = body["n"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise BadRequest(f"n must be a positive integer, got {n!r}", param="n")
    if n not in (None, 1):
        raise BadRequest("only n=1 is supported", param="n")


def _same(value: Any, neutral: Any) -> bool:
    """Equality that keeps booleans apart from numbers (``False == 0`` in Python)."""
    if value is None or neutral is None:
        return value is neutral
    if isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return bool(value == neutral)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required and must be a non-empty string", param="model")
    return model.strip()


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string", param=key)
    return value


def _stream_fields(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise BadRequest(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    if not isinstance(options, Mapping):
        raise BadRequest("stream_options must be an object", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest(
            "stream_options.include_usage must be a boolean", param="stream_options.include_usage"
        )
    return stream, include


def _sampling(
    body: Mapping[str, Any], *, max_tokens_default: int | None, max_tokens_keys: Sequence[str]
) -> SamplingFields:
    max_tokens: int | None = max_tokens_default
    for key in max_tokens_keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"{key} must be a positive integer, got {value!r}", param=key)
        max_tokens = value
        break
    if _SAMPLING_KEYS.isdisjoint(body):  # the usual request: every default
        return SamplingFields(max_tokens, _TEMPERATURE, _TOP_P, None, ())
    return SamplingFields(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", default=_TEMPERATURE, low=0.0, high=2.0),
        top_p=_number(body, "top_p", default=_TOP_P, low=0.0, high=1.0, low_open=True),
        seed=_seed(body),
        stop=_stop(body.get("stop")),
    )


_TEMPERATURE = 1.0  # OpenAI's defaults
_TOP_P = 1.0


def _number(
    body: Mapping[str, Any],
    key: str,
    *,
    default: float,
    low: float,
    high: float,
    low_open: bool = False,
) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a number", param=key)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise BadRequest(f"{key} must be in {bracket}{low:g}, {high:g}], got {value}", param=key)
    return float(value)


def _seed(body: Mapping[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise BadRequest("seed must be an integer", param="seed")
    return seed


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    if len(items) > 4:
        raise BadRequest("stop may hold at most 4 sequences", param="stop")
    if any(s == "" for s in items):
        raise BadRequest("stop sequences must not be empty", param="stop")
    return tuple(items)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _prompts(value: Any, *, param: str) -> list[Prompt]:
    """A string, a list of strings, a token array, or a list of token arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_token_list(value):
            return [_check_tokens(value, param)]
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(_is_token_list(item) for item in value):
            return [_check_tokens(item, f"{param}[{i}]") for i, item in enumerate(value)]
    raise BadRequest(
        f"{param} must be a non-empty string, list of strings, token array or list of token arrays",
        param=param,
    )


def _check_tokens(tokens: list[int], param: str) -> list[int]:
    if not tokens:
        raise BadRequest(f"{param} must not be an empty token array", param=param)
    if any(t < 0 for t in tokens):
        raise BadRequest(f"{param} holds a negative token id", param=param)
    return tokens


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages must be a non-empty array", param="messages")
    messages: list[dict[str, str]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in _MESSAGE_ROLES:
            raise BadRequest(
                f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        messages.append({"role": str(role), "content": _content(message.get("content"), where)})
    return messages


def _content(content: Any, where: str) -> str:
    """Message content: a string, null, or text parts (joined); images are refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise BadRequest(
                    f"{where}.content[{j}]: only text parts are supported",
                    param=f"{where}.content",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(
                    f"{where}.content[{j}].text must be a string", param=f"{where}.content"
                )
            texts.append(text)
        return "".join(texts)
    raise BadRequest(
        f"{where}.content must be a string or an array of parts", param=f"{where}.content"
    )


def _keep_alive(body: Mapping[str, Any]) -> float | None:
    """The request's own ``keep_alive`` (Ollama's field): a duration, 0, or -1 for never."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, str | int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise BadRequest('keep_alive must be a duration such as "5m", 0 or -1', param="keep_alive")
    try:
        return parse_keep_alive(value, key="keep_alive")
    except ConfigError as exc:
        raise BadRequest(str(exc), param="keep_alive") from None
