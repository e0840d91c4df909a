"""Parsing and validating OpenAI request bodies into typed requests.

The typed requests themselves (``routerd.serving.requests``) sit below HTTP, where
serving takes them; this module is the HTTP side that builds them from JSON.

Which fields exist, and which are refused, is one table (``routerd.api.fields``):
every field of OpenAI's and vLLM's request schemas is honoured or, set to anything but
a neutral value, refused with a 400 naming it — a client asking for something must not
believe it got it. Fields in neither schema are ignored (as OpenAI-compatible servers
do) and named in the request's ``ignored``, which the handler logs and answers in a
header. Every check names the offending field in ``param``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from contract.generation import SamplingParams
from routerd.api import fields
from routerd.config import ConfigError, parse_keep_alive
from routerd.errors import BadRequest
from routerd.serving.requests import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    Prompt,
    SamplingFields,
)

MAX_STOP_SEQUENCES: Final = 32  # the default of ``[server] max_stop_sequences``
MAX_CHOICES: Final = 128  # n and best_of


def parse_completion(
    body: Mapping[str, Any], *, max_stop: int = MAX_STOP_SEQUENCES
) -> CompletionRequest:
    ignored = _check_fields(body, COMPLETION_FIELDS, COMPLETION_REFUSED)
    if body.get("max_completion_tokens") is not None:
        # Chat's field, absent from the legacy completions API: ignoring it would let
        # the client believe its limit held while max_tokens' default applied.
        raise BadRequest(
            "max_completion_tokens is a field of /v1/chat/completions; "
            "/v1/completions takes max_tokens",
            param="max_completion_tokens",
        )
    stream, include_usage = _stream_fields(body)
    echo, logprobs, n, best_of = False, None, 1, None
    if not _CHOICE_KEYS.isdisjoint(body):  # the usual request has none of these
        echo = _flag(body, "echo")
        logprobs = _integer(body, "logprobs", 0, 5)
        n = _integer(body, "n", 1, MAX_CHOICES) or 1
        best_of = _integer(body, "best_of", 1, MAX_CHOICES)
        if best_of is not None and best_of < n:
            raise BadRequest(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
        if best_of is not None and best_of > n and stream:
            raise BadRequest("best_of greater than n cannot be streamed", param="best_of")
    max_tokens = _max_tokens(body, ("max_tokens",), default=16, low=0)
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens may be 0 only with echo", param="max_tokens")
    sampling = _sampling(body, max_stop, max_tokens, logprobs)
    params = sampling.params
    if echo and logprobs is not None:  # the prompt's tokens get logprobs too
        params.prompt_logprobs = max(logprobs, params.prompt_logprobs or 0)
    if best_of is not None and best_of > n and params.logprobs is None:
        params.logprobs = 0  # choices are ranked by their tokens' log-probabilities
        sampling.plain = False
    req = CompletionRequest(
        model=_model(body),
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        user=_optional_str(body, "user"),
        keep_alive=_keep_alive(body),
        n=n,
        logprobs=logprobs,
        ignored=ignored,
        prompts=_prompts(body.get("prompt"), param="prompt"),
        echo=echo,
        best_of=best_of,
    )
    _extras(body, req)
    return req


def parse_chat(body: Mapping[str, Any], *, max_stop: int = MAX_STOP_SEQUENCES) -> ChatRequest:
    ignored = _check_fields(body, CHAT_FIELDS, CHAT_REFUSED)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), default=None, low=1)
    logprobs: int | None = None
    n = 1
    if not _CHOICE_KEYS.isdisjoint(body):  # the usual request has none of these
        top = _integer(body, "top_logprobs", 0, 20)
        if _flag(body, "logprobs"):
            logprobs = top or 0
        elif top:
            raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        n = _integer(body, "n", 1, MAX_CHOICES) or 1
    stream, include_usage = _stream_fields(body)
    req = ChatRequest(
        model=_model(body),
        sampling=_sampling(body, max_stop, max_tokens, logprobs),
        stream=stream,
        include_usage=include_usage,
        user=_optional_str(body, "user"),
        keep_alive=_keep_alive(body),
        n=n,
        logprobs=logprobs,
        ignored=ignored,
        messages=_messages(body.get("messages")),
    )
    _extras(body, req)
    return req


# Fields most requests leave out, read only when one of them is there.
_CHOICE_KEYS: Final = frozenset(("echo", "logprobs", "top_logprobs", "n", "best_of"))
_EXTRA_KEYS: Final = frozenset(
    (
        "prompt_logprobs",
        "return_tokens_as_token_ids",
        "truncate_prompt_tokens",
        "safety_identifier",
        "prompt_cache_key",
    )
)


def _extras(body: Mapping[str, Any], req: GenerationRequest) -> None:
    """vLLM's response options and the routing key's fallbacks, into ``req``."""
    if _EXTRA_KEYS.isdisjoint(body):
        return
    req.prompt_logprobs = _integer(body, "prompt_logprobs", 0, 20)
    req.tokens_as_ids = _flag(body, "return_tokens_as_token_ids")
    req.truncate_prompt_tokens = _truncation(body)
    req.user = _routing_key(body)


def parse_embedding(body: Mapping[str, Any]) -> EmbeddingRequest:
    ignored = _check_fields(body, EMBEDDING_FIELDS, EMBEDDING_REFUSED)
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
        truncate_prompt_tokens=_truncation(body),
        ignored=ignored,
    )


# -- fields ----------------------------------------------------------------------

COMPLETION_FIELDS: Final = frozenset(fields.COMPLETION)
CHAT_FIELDS: Final = frozenset(fields.CHAT)
EMBEDDING_FIELDS: Final = frozenset(fields.EMBEDDING)
COMPLETION_REFUSED: Final = fields.refused_fields(fields.COMPLETION)
CHAT_REFUSED: Final = fields.refused_fields(fields.CHAT)
EMBEDDING_REFUSED: Final = fields.refused_fields(fields.EMBEDDING)

_MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_fields(
    body: Mapping[str, Any], known: frozenset[str], refused: Mapping[str, tuple[Any, ...]]
) -> tuple[str, ...]:
    """Refuse a refused field set to a value that asks for something; return the names
    of the fields in neither schema, which are ignored."""
    if not refused.keys().isdisjoint(body):  # usually disjoint: one set operation in C
        for key, neutral in refused.items():  # in this order: the same field named each time
            if key in body and not any(_same(body[key], v) for v in neutral):
                raise BadRequest(f"{key} is not supported by routerd", param=key)
    unknown = body.keys() - known
    return tuple(sorted(unknown)) if unknown else ()


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


def _max_tokens(
    body: Mapping[str, Any], keys: Sequence[str], *, default: int | None, low: int
) -> int | None:
    """The first of ``keys`` that is set; ``default`` when none is."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            word = "a positive" if low > 0 else "a non-negative"
            raise BadRequest(f"{key} must be {word} integer, got {value!r}", param=key)
        return value
    return default


# The request fields named as ``SamplingParams`` names them (vLLM's names); ``logprobs``
# is read per endpoint (chat's is a flag, completions' a count).
_PARAM_KEYS: Final = frozenset(SamplingParams.__slots__) - {"max_tokens", "logprobs"}


def _sampling(
    body: Mapping[str, Any], max_stop: int, max_tokens: int | None, logprobs: int | None
) -> SamplingFields:
    """How the request decodes: ``max_tokens`` as asked, and its ``SamplingParams``
    (whose ``max_tokens`` serving sets per prompt)."""
    if _PARAM_KEYS.isdisjoint(body):  # the usual request: every default
        params = SamplingParams(max_tokens=0, logprobs=logprobs)
        return SamplingFields(max_tokens, params, plain=logprobs is None)
    return SamplingFields(max_tokens, _params(body, max_stop, max_tokens, logprobs))


def _params(
    body: Mapping[str, Any], max_stop: int, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """The request's ``SamplingParams`` from its fields (``max_tokens`` set later)."""
    min_tokens = _integer(body, "min_tokens", 0, None) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise BadRequest(
            f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    top_k = _integer(body, "top_k", -1, None) or 0
    return SamplingParams(
        max_tokens=0,
        temperature=_number(body, "temperature", default=1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", default=1.0, low=0.0, high=1.0, low_open=True),
        seed=_seed(body),
        stop=_stop(body.get("stop"), max_stop),
        top_k=max(top_k, 0),
        min_p=_number(body, "min_p", default=0.0, low=0.0, high=1.0),
        presence_penalty=_number(body, "presence_penalty", default=0.0, low=-2.0, high=2.0),
        frequency_penalty=_number(body, "frequency_penalty", default=0.0, low=-2.0, high=2.0),
        repetition_penalty=_number(
            body, "repetition_penalty", default=1.0, low=0.0, high=2.0, low_open=True
        ),
        logit_bias=_logit_bias(body.get("logit_bias")),
        allowed_token_ids=_allowed_ids(body.get("allowed_token_ids")),
        ignore_eos=_flag(body, "ignore_eos"),
        min_tokens=min_tokens,
        stop_token_ids=_token_ids(body.get("stop_token_ids"), "stop_token_ids", max_stop),
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output"),
        logprobs=logprobs,
        prompt_logprobs=_integer(body, "prompt_logprobs", 0, 20),
    )


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean", param=key)
    return value


def _integer(body: Mapping[str, Any], key: str, low: int, high: int | None) -> int | None:
    """An optional integer in [low, high] (no upper bound when ``high`` is None)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", param=key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{key} must be {bound}, got {value}", param=key)
    return value


def _truncation(body: Mapping[str, Any]) -> int | None:
    value = _integer(body, "truncate_prompt_tokens", -1, None)
    if value == 0:
        raise BadRequest(
            "truncate_prompt_tokens must be -1 or a positive integer",
            param="truncate_prompt_tokens",
        )
    return value


def _routing_key(body: Mapping[str, Any]) -> str | None:
    """The sticky routing key: ``user``, else ``safety_identifier`` (OpenAI's successor
    of it), else ``prompt_cache_key`` (a hint that requests belong together)."""
    keys = [_optional_str(body, k) for k in ("user", "safety_identifier", "prompt_cache_key")]
    return next((k for k in keys if k is not None), None)


_MAX_BIAS_ENTRIES: Final = 1024


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BadRequest("logit_bias must be an object of token id → bias", param="logit_bias")
    if len(value) > _MAX_BIAS_ENTRIES:
        raise BadRequest(
            f"logit_bias may hold at most {_MAX_BIAS_ENTRIES} entries", param="logit_bias"
        )
    bias: dict[int, float] = {}
    for key, amount in value.items():
        token = _token_key(key)
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not _finite(amount)
            or not -100 <= amount <= 100
        ):
            raise BadRequest(
                f"logit_bias[{key!r}] must be a number between -100 and 100", param="logit_bias"
            )
        bias[token] = float(amount)
    return bias or None


def _token_key(key: Any) -> int:
    """A logit_bias key: a token id written as a decimal string (JSON keys are strings)."""
    text = str(key)
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadRequest(
            f"logit_bias keys must be token ids, got {text[:40]!r}", param="logit_bias"
        )
    return int(text)


def _allowed_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    ids = _token_ids(value, "allowed_token_ids", None)
    if not ids:
        raise BadRequest("allowed_token_ids must not be empty", param="allowed_token_ids")
    return list(ids)


def _token_ids(value: Any, key: str, limit: int | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if not _is_token_list(value) or any(t < 0 for t in value):
        raise BadRequest(f"{key} must be a list of token ids", param=key)
    if limit is not None and len(value) > limit:
        raise BadRequest(f"{key} may hold at most {limit} token ids", param=key)
    return tuple(value)


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
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise BadRequest(f"{key} must be a number", param=key)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise BadRequest(f"{key} must be in {bracket}{low:g}, {high:g}], got {value}", param=key)
    return float(value)


def _finite(value: int | float) -> bool:
    """Whether a JSON number is finite; an integer always is (and ``math.isfinite``
    cannot take one past a double's range)."""
    return isinstance(value, int) or math.isfinite(value)


def _seed(body: Mapping[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise BadRequest("seed must be an integer", param="seed")
    return seed


def _stop(value: Any, limit: int) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    if len(items) > limit:
        raise BadRequest(f"stop may hold at most {limit} sequences", param="stop")
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
