"""Every request field of the OpenAI endpoints routerd serves: honoured, or refused.

One table per endpoint, read by three parts that must agree: the parsers
(``routerd.api.schemas``: which fields exist, which values of a refused field mean "not
asked for"), the OpenAPI document (``routerd.api.openapi``: the request bodies) and the
README's API table (``api_table``, compared with the README by a test).

The fields are the union of OpenAI's request schemas and vLLM's extensions to them, so
that a client written for either is understood. A field is

- *supported*: honoured, with its meaning in OpenAI's or vLLM's documentation;
- *refused*: known, but routerd cannot honour it. Left out, or set to one of its
  neutral values (the ones that mean "not asked for", e.g. ``null``), it is accepted;
  any other value gets a 400 naming it. It is never accepted and then ignored.

Fields in neither schema are ignored, as OpenAI-compatible servers do, but named in a
warning log line and in the response header ``x-routerd-ignored-fields``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final


@dataclass(frozen=True)
class Field:
    """One request field: its JSON schema, what it does, and whether it is refused.

    ``neutral`` is None for a supported field; for a refused one, the values accepted
    as "not asked for" (compared without mixing booleans and numbers).
    """

    name: str
    schema: Mapping[str, Any]
    description: str
    neutral: tuple[Any, ...] | None = None

    @property
    def refused(self) -> bool:
        return self.neutral is not None


_NULL = {"type": "null"}


def _of(*types: str, **extra: Any) -> dict[str, Any]:
    """A JSON schema of ``types`` that also accepts null (clients send null for unset)."""
    return {"type": [*types, "null"], **extra}


_INT = _of("integer")
_NUMBER = _of("number")
_BOOL = _of("boolean")
_STRING = _of("string")
_OBJECT = _of("object")
_ANY: dict[str, Any] = {}
_INT_LIST = _of("array", items={"type": "integer"})
_PROMPTS = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    ]
}
_KEEP_ALIVE_TEXT = (
    "routerd (Ollama's field): how long the instance stays loaded after this request: "
    'a duration ("5m", "1h30m"), seconds, 0 to unload when idle, -1 for never.'
)
_KEEP_ALIVE = {"type": ["string", "number", "null"]}


def _supported(name: str, schema: Mapping[str, Any], description: str) -> Field:
    return Field(name, schema, description)


def _refused(name: str, description: str, *neutral: Any) -> Field:
    return Field(name, _ANY, description, neutral or (None,))


# -- fields that completions and chat share ------------------------------------------

_GENERATION: Final = (
    _supported("model", {"type": "string"}, "`name` (routed) or `name@version` (pinned)."),
    _supported("n", _of("integer", minimum=1, maximum=128), "Choices to generate (1–128)."),
    _supported(
        "temperature",
        _of("number", minimum=0, maximum=2),
        "0–2; 0 is greedy decoding. Default 1.",
    ),
    _supported("top_p", _of("number", minimum=0, maximum=1), "Nucleus sampling, (0, 1]."),
    _supported(
        "top_k",
        _of("integer", minimum=-1),
        "vLLM: sample among the k most likely tokens; 0 or -1 for no limit.",
    ),
    _supported(
        "min_p",
        _of("number", minimum=0, maximum=1),
        "vLLM: drop tokens less likely than min_p × the most likely one's probability.",
    ),
    _supported("seed", _INT, "Makes sampling repeatable (README: what seed guarantees)."),
    _supported(
        "presence_penalty",
        _of("number", minimum=-2, maximum=2),
        "-2–2: lowers the logits of tokens already generated, once.",
    ),
    _supported(
        "frequency_penalty",
        _of("number", minimum=-2, maximum=2),
        "-2–2: lowers the logits of tokens already generated, per occurrence.",
    ),
    _supported(
        "repetition_penalty",
        _of("number", exclusiveMinimum=0, maximum=2),
        "vLLM: > 1 discourages tokens of the prompt and the output (divides positive "
        "logits, multiplies negative ones); 1 for none.",
    ),
    _supported(
        "logit_bias",
        _of("object", additionalProperties={"type": "number", "minimum": -100, "maximum": 100}),
        "Token id (as a string) → bias added to its logit, -100–100.",
    ),
    _supported("allowed_token_ids", _INT_LIST, "vLLM: only these token ids may be generated."),
    _supported(
        "stop",
        {"type": ["string", "array", "null"], "items": {"type": "string"}},
        "Stop strings (at most `[server] max_stop_sequences`, default 32); cut from the text.",
    ),
    _supported(
        "stop_token_ids",
        _INT_LIST,
        "vLLM: token ids that end the choice (at most `[server] max_stop_sequences`).",
    ),
    _supported("include_stop_str_in_output", _BOOL, "vLLM: keep the stop string in the text."),
    _supported(
        "ignore_eos",
        _BOOL,
        "vLLM: the end-of-sequence token does not end the choice; it runs to max_tokens.",
    ),
    _supported(
        "min_tokens",
        _of("integer", minimum=0),
        "vLLM: no end-of-sequence or stop token before this many tokens.",
    ),
    _supported(
        "prompt_logprobs",
        _of("integer", minimum=0, maximum=20),
        "vLLM: log-probabilities of the prompt's tokens with this many alternatives, in "
        "the response's `prompt_logprobs` (vLLM's shape; the first is null).",
    ),
    _supported(
        "truncate_prompt_tokens",
        _of("integer", minimum=-1),
        "vLLM: keep only the prompt's last k tokens (-1: as many as the context holds).",
    ),
    _supported(
        "return_tokens_as_token_ids",
        _BOOL,
        'vLLM: logprobs name tokens as "token_id:N" instead of their text.',
    ),
    _supported("stream", _BOOL, "Server-sent events; ends with `data: [DONE]`."),
    _supported(
        "stream_options",
        _of("object", properties={"include_usage": {"type": "boolean"}}),
        "`include_usage`: a last chunk with the usage. Only with stream=true.",
    ),
    _supported(
        "user",
        _STRING,
        "Sticky routing key: one user stays on one version of a weighted route.",
    ),
    _supported(
        "safety_identifier",
        _STRING,
        "OpenAI's successor of `user`: the sticky routing key when `user` is absent.",
    ),
    _supported(
        "prompt_cache_key",
        _STRING,
        "A routing hint: the sticky routing key when `user` and `safety_identifier` are absent.",
    ),
    _supported("keep_alive", _KEEP_ALIVE, _KEEP_ALIVE_TEXT),
    _refused("response_format", "Structured output (not yet).", None, {"type": "text"}),
    _refused("structured_outputs", "vLLM: structured output (not yet)."),
    _refused("guided_json", "vLLM (older): structured output (not yet)."),
    _refused("guided_regex", "vLLM (older): structured output (not yet)."),
    _refused("guided_choice", "vLLM (older): structured output (not yet)."),
    _refused("guided_grammar", "vLLM (older): structured output (not yet)."),
    _refused("guided_decoding_backend", "vLLM (older): structured output (not yet)."),
    _refused("guided_whitespace_pattern", "vLLM (older): structured output (not yet)."),
    _refused("structural_tag", "vLLM (older): structured output (not yet)."),
    _refused("use_beam_search", "vLLM: beam search.", None, False),
    _refused("length_penalty", "vLLM: beam search's length penalty.", None, 1, 1.0),
    _refused("bad_words", "vLLM: words never to generate.", None, []),
    _refused("logits_processors", "vLLM: custom logits processors.", None, []),
    _refused("logprob_token_ids", "vLLM: logprobs of chosen token ids.", None, []),
    _refused("skip_special_tokens", "vLLM: special tokens are always left out.", None, True),
    _refused("spaces_between_special_tokens", "vLLM: detokenizer option.", None, True),
    _refused("truncation_side", "vLLM: prompts are truncated on the left.", None, "left"),
    _refused("priority", "vLLM: scheduling priority (tenants come later).", None, 0),
    _refused("request_id", "vLLM: a caller-chosen request id (use x-request-id).", None),
    _refused("session_id", "vLLM: a session id.", None),
    _refused("return_token_ids", "vLLM: token ids in the response.", None, False),
    _refused("return_token_offsets", "vLLM: token offsets in the response.", None, False),
    _refused("cache_salt", "vLLM: prefix-cache salt.", None),
    _refused("kv_transfer_params", "vLLM: disaggregated prefill.", None),
    _refused("ec_transfer_params", "vLLM: disaggregated encoder.", None),
    _refused("vllm_xargs", "vLLM: extra arguments for custom extensions.", None, {}),
    _refused("repetition_detection", "vLLM: repetition detection.", None),
    _refused("stream_interval", "vLLM: tokens per streamed chunk.", None, 1),
    _refused("thinking_token_budget", "vLLM: reasoning budget.", None),
    _refused("watermarking", "vLLM: watermarking.", None),
    _refused("routed_experts_prompt_start", "vLLM: MoE introspection.", None, 0),
    _refused("mm_payload", "vLLM: multimodal payload format.", None, "tensors"),
    _refused("return_mm_kwargs", "vLLM: multimodal introspection.", None, False),
    _refused("mm_processor_kwargs", "vLLM: multimodal processor options.", None, {}),
    _refused("metadata", "OpenAI: stored-completion metadata (nothing is stored).", None, {}),
    _refused("store", "OpenAI: stored completions (nothing is stored).", None, False),
    _refused("service_tier", "OpenAI: service tiers.", None, "auto", "default"),
)

_COMPLETION_ONLY: Final = (
    _supported("prompt", _PROMPTS, "A string, strings, a token array or token arrays."),
    _supported(
        "max_tokens",
        _of("integer", minimum=0),
        "Tokens to generate per choice (default 16); 0 only with echo.",
    ),
    _supported(
        "best_of",
        _of("integer", minimum=1, maximum=128),
        "Generate best_of choices per prompt and return the n with the highest "
        "log-probability (not with stream).",
    ),
    _supported("echo", _BOOL, "The prompt comes before the completion in `text` (and logprobs)."),
    _supported(
        "logprobs",
        _of("integer", minimum=0, maximum=5),
        "Log-probabilities of each token with this many alternatives (0–5).",
    ),
    _refused("suffix", "OpenAI: text after the insertion (fill-in-the-middle).", None, ""),
    _refused("prompt_embeds", "vLLM: prompts as embeddings.", None),
    _refused(
        "add_special_tokens", "vLLM: prompts always get the tokenizer's special tokens.", None, True
    ),
)

_CHAT_ONLY: Final = (
    _supported(
        "messages",
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                    "content": {"type": ["string", "array", "null"]},
                },
            },
        },
        "Rendered with the model's chat template; text content parts only.",
    ),
    _supported(
        "max_tokens", _of("integer", minimum=1), "Deprecated by OpenAI for max_completion_tokens."
    ),
    _supported(
        "max_completion_tokens",
        _of("integer", minimum=1),
        "Tokens to generate per choice; preferred over max_tokens when both are set.",
    ),
    _supported("logprobs", _BOOL, "Log-probabilities of the content's tokens."),
    _supported(
        "top_logprobs",
        _of("integer", minimum=0, maximum=20),
        "With logprobs: this many alternatives per token (0–20).",
    ),
    _refused("tools", "Tool calls (not yet).", None, []),
    _refused("tool_choice", "Tool calls (not yet).", None, "none", "auto"),
    _refused("parallel_tool_calls", "Tool calls (not yet).", None, True, False),
    _refused("functions", "OpenAI (deprecated): function calls.", None, []),
    _refused("function_call", "OpenAI (deprecated): function calls.", None, "none", "auto"),
    _refused("audio", "OpenAI: audio output.", None),
    _refused("modalities", "OpenAI: output modalities; text only.", None, ["text"]),
    _refused("prediction", "OpenAI: predicted outputs.", None),
    _refused("reasoning_effort", "OpenAI: reasoning models.", None),
    _refused("verbosity", "OpenAI: reasoning models.", None),
    _refused("web_search_options", "OpenAI: web search.", None),
    _refused("prompt_cache_retention", "OpenAI: prompt cache retention.", None),
    _refused("include_reasoning", "vLLM: reasoning output.", None, True),
    _refused("echo", "vLLM: echo the last message.", None, False),
    _refused("add_generation_prompt", "vLLM: the template always adds it.", None, True),
    _refused("continue_final_message", "vLLM: continue the last message.", None, False),
    _refused("add_special_tokens", "vLLM: the template writes every special token.", None, False),
    _refused("documents", "vLLM: documents for the template (RAG).", None, []),
    _refused("chat_template", "vLLM: the model's own template is used.", None),
    _refused("chat_template_kwargs", "vLLM: template arguments.", None, {}),
    _refused("media_io_kwargs", "vLLM: multimodal media options.", None, {}),
    _refused("return_prompt_text", "vLLM: the rendered prompt in the response.", None, False),
)

_EMBEDDING_FIELDS: Final = (
    _supported("model", {"type": "string"}, "`name` (routed) or `name@version` (pinned)."),
    _supported("input", _PROMPTS, "A string, strings, a token array or token arrays."),
    _supported(
        "encoding_format", _of("string", enum=["float", "base64", None]), "float or base64."
    ),
    _supported("user", _STRING, "Sticky routing key."),
    _supported("keep_alive", _KEEP_ALIVE, _KEEP_ALIVE_TEXT),
    _supported(
        "truncate_prompt_tokens",
        _of("integer", minimum=-1),
        "vLLM: keep only each input's last k tokens (-1: as many as the context holds).",
    ),
    _refused("dimensions", "OpenAI: shortened embeddings.", None),
    _refused("add_special_tokens", "vLLM: inputs always get the special tokens.", None, True),
    _refused("embed_dtype", "vLLM: float32 only.", None, "float32"),
    _refused("endianness", "vLLM: base64 is little-endian float32.", None, "native", "little"),
    _refused("padding", "vLLM: padding options.", None),
    _refused("use_activation", "vLLM: pooler activation.", None),
    _refused("truncation_side", "vLLM: inputs are truncated on the left.", None, "left"),
    _refused("request_id", "vLLM: a caller-chosen request id (use x-request-id).", None),
    _refused("priority", "vLLM: scheduling priority (tenants come later).", None, 0),
    _refused("mm_processor_kwargs", "vLLM: multimodal processor options.", None, {}),
    _refused("cache_salt", "vLLM: prefix-cache salt.", None),
)


def _table(*groups: tuple[Field, ...]) -> dict[str, Field]:
    """Fields by name; a later group's field replaces an earlier one of the same name."""
    return {f.name: f for group in groups for f in group}


COMPLETION: Final = _table(_GENERATION, _COMPLETION_ONLY)
CHAT: Final = _table(_GENERATION, _CHAT_ONLY)
EMBEDDING: Final = _table(_EMBEDDING_FIELDS)

ENDPOINTS: Final = {
    "/v1/completions": COMPLETION,
    "/v1/chat/completions": CHAT,
    "/v1/embeddings": EMBEDDING,
}


def refused_fields(table: Mapping[str, Field]) -> dict[str, tuple[Any, ...]]:
    """Each refused field of ``table`` with its neutral values."""
    return {name: f.neutral for name, f in table.items() if f.neutral is not None}


_REQUIRED: Final = {
    "/v1/completions": ["model", "prompt"],
    "/v1/chat/completions": ["model", "messages"],
    "/v1/embeddings": ["model", "input"],
}


def request_schema(endpoint: str) -> dict[str, Any]:
    """The OpenAPI schema of ``endpoint``'s request body, from its table.

    A refused field is described with the values it is accepted at. Other properties
    are allowed: a field in neither schema is ignored (and named in the response).
    """
    properties: dict[str, Any] = {}
    for name, field in sorted(ENDPOINTS[endpoint].items()):
        if field.refused:
            accepted = ", ".join(_json(v) for v in field.neutral or ())
            text = f"Not supported: {field.description} Accepted unset or as {accepted}; "
            text += "any other value is refused with a 400 naming it."
            properties[name] = {"description": text}
        else:
            properties[name] = {**field.schema, "description": field.description}
    return {"type": "object", "required": _REQUIRED[endpoint], "properties": properties}


def api_table() -> str:
    """The README's API table, made from the tables above (a test keeps them equal)."""
    lines = ["| Endpoint | Field | Status | Notes |", "|---|---|---|---|"]
    for endpoint in ("GET /v1/models", "GET /v1/models/{id}"):
        lines.append(f"| `{endpoint}` | (no body) | supported | |")
    for endpoint, table in ENDPOINTS.items():
        for name in sorted(table):
            field = table[name]
            status = "refused with 400" if field.refused else "supported"
            if field.refused:
                accepted = ", ".join(_json(v) for v in field.neutral or ())
                note = f"{field.description} Accepted unset or as {accepted}."
            else:
                note = field.description
            lines.append(f"| `POST {endpoint}` | `{name}` | {status} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def _json(value: Any) -> str:
    return f"`{json.dumps(value)}`"
