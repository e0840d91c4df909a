"""The ``transformers`` backend: any local Hugging Face folder, run in-process by torch.

It serves two tasks: text generation (``*ForCausalLM`` checkpoints) and
embeddings (encoders such as BERT). It reads local folders only — never the
network — and only safetensors weights, so loading cannot run pickled code.

Generation is a hand-written decode loop over the model's forward pass with its
KV cache rather than ``model.generate``: routerd needs to check cancellation,
stop strings and stream text between every two tokens. The text-side parts of
that loop (incremental detokenizing, stop-string holdback) live in
:mod:`backends.hf_text`.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import re
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from backends.base import (
    BackendError,
    Cancellation,
    GenerationResult,
    InvalidRequest,
    LoadSpec,
    ModelInfo,
    SamplingParams,
    Task,
    TextSink,
)
from backends.hf_text import IncrementalDetokenizer, StopStringHoldback

_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TASKS = ("auto", "generate", "embed")
_OPTION_KEYS = ("dtype", "task", "max_context")
# Tokenizers without a known limit report a huge sentinel (1e30); ignore those.
_SENSIBLE_MAX_LENGTH = 10_000_000
_FALLBACK_CONTEXT = 2048


class _ProgressBars:
    """Hides transformers' "Loading weights" bars, which would litter daemon logs.

    Loads run in several executor threads at once, so hiding is reference-counted
    and the global switch is restored only when the last load finishes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._was_enabled = True

    @contextlib.contextmanager
    def hidden(self) -> Iterator[None]:
        from transformers.utils import logging

        hf_logging: Any = logging  # untyped module
        with self._lock:
            if self._users == 0:
                self._was_enabled = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._was_enabled:
                    hf_logging.enable_progress_bar()


_PROGRESS_BARS = _ProgressBars()


def _options_error(key: str, value: object, allowed: str) -> InvalidRequest:
    return InvalidRequest(
        f"option {key!r} has invalid value {value!r}; allowed: {allowed}", param=key
    )


class TransformersBackend:
    """Loads local Hugging Face folders with ``transformers`` on cpu or one cuda device."""

    kind = "transformers"

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``dtype``, ``task`` and ``max_context``; fill in defaults."""
        unknown = sorted(set(options) - set(_OPTION_KEYS))
        if unknown:
            raise InvalidRequest(
                f"unknown option {unknown[0]!r} for the transformers backend; "
                f"allowed: {', '.join(_OPTION_KEYS)}",
                param=unknown[0],
            )
        dtype = options.get("dtype", "auto")
        if dtype not in _DTYPES:
            raise _options_error("dtype", dtype, ", ".join(_DTYPES))
        task = options.get("task", "auto")
        if task not in _TASKS:
            raise _options_error("task", task, ", ".join(_TASKS))
        normalized: dict[str, Any] = {"dtype": dtype, "task": task}
        if "max_context" in options:
            limit = options["max_context"]
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise _options_error("max_context", limit, "a positive integer")
            normalized["max_context"] = limit
        return normalized

    def load(self, spec: LoadSpec) -> TransformersModel:
        """Load tokenizer and model from ``spec.path`` onto ``spec.device``."""
        options = self.validate_options(spec.options)
        device = _resolve_device(spec.device)
        folder = Path(spec.path)
        config = _read_config(folder)
        _check_weights(folder)
        task = _resolve_task(options["task"], config)
        dtype = _resolve_dtype(options["dtype"], device)

        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        auto_class: Any = AutoModelForCausalLM if task is Task.GENERATE else AutoModel
        model: Any = None
        try:
            with _PROGRESS_BARS.hidden():
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
                model = auto_class.from_pretrained(
                    str(folder), local_files_only=True, use_safetensors=True, dtype=dtype
                )
            model.to(device)
        except Exception as exc:  # whatever failed, the caller needs one clear BackendError
            # A failed load must give back what it took (e.g. half-copied weights
            # after a CUDA OOM): the traceback's frames still hold the model.
            model = None
            traceback.clear_frames(exc.__traceback__)
            _release_memory(device)
            raise BackendError(
                f"could not load {spec.name}@{spec.version} from {folder} "
                f"as a {task.value} model: {exc}"
            ) from exc
        model.eval()
        info = ModelInfo(
            task=task,
            context_length=_context_length(model.config, tokenizer, options.get("max_context")),
            device=spec.device,
            dtype=str(dtype).removeprefix("torch."),
            has_chat_template=getattr(tokenizer, "chat_template", None) is not None,
            vocab_size=int(model.get_input_embeddings().num_embeddings),
        )
        return TransformersModel(model, tokenizer, info, device, spec.name)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise BackendError(f"unknown device {name!r}; expected 'cpu' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise BackendError(
            f"device {name} was requested but CUDA is not available to torch "
            f"{torch.__version__} on this host"
        )
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise BackendError(
            f"device {name} does not exist; torch sees {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise BackendError(f"model folder {folder} does not exist or is not a directory")
    path = folder / "config.json"
    if not path.is_file():
        raise BackendError(f"model folder {folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BackendError(f"{path} does not hold a JSON object")
    return config


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = f" (found {', '.join(others)}; only safetensors are loaded)" if others else ""
    raise BackendError(f"model folder {folder} has no safetensors weights{hint}")


def _resolve_task(option: str, config: Mapping[str, Any]) -> Task:
    if option != "auto":
        return Task(option)
    architectures = config.get("architectures") or []
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    return Task.GENERATE if causal else Task.EMBED


def _resolve_dtype(option: str, device: torch.device) -> torch.dtype:
    chosen = _DTYPES[option]
    if chosen is not None:
        return chosen
    if device.type == "cpu":
        return torch.float32  # bf16 matmuls on many CPUs are slower and less exact
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _context_length(config: Any, tokenizer: Any, max_context: int | None) -> int:
    """The smallest of the model's positions, the tokenizer's limit and the option."""
    limits: list[int] = []
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < _SENSIBLE_MAX_LENGTH:
        limits.append(tokenizer_max)
    if max_context is not None:
        limits.append(max_context)
    return min(limits) if limits else _FALLBACK_CONTEXT


def _sample(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> int:
    """Pick the next token from one row of logits: greedy, or temperature + top-p."""
    if params.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=rng).item())
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    outside = mass_before >= params.top_p  # the mass before a token already reaches top_p
    outside[0] = False  # the most likely token always stays
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=rng)
    return int(order[choice].item())


class TransformersModel:
    """One loaded folder on one device; implements ``backends.base.LoadedModel``."""

    def __init__(
        self, model: Any, tokenizer: Any, info: ModelInfo, device: torch.device, name: str
    ) -> None:
        self._model: Any = model
        self._tokenizer: Any = tokenizer
        self._info = info
        self._device = device
        self._name = name
        self._eos_ids = _eos_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" if "logits_to_keep" in params else None

    @property
    def info(self) -> ModelInfo:
        return self._info

    # -- tokenizing -------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Tokenize with the tokenizer's own special tokens (e.g. a leading bos)."""
        return [int(i) for i in self._tokenizer.encode(text)]

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        if not self._info.has_chat_template:
            raise InvalidRequest(
                f"model {self._name} has no chat template; use the completions endpoint",
                param="messages",
            )
        try:
            text = self._tokenizer.apply_chat_template(
                [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # any error of a third-party template is the input's fault
            raise InvalidRequest(
                f"messages do not fit the chat template of {self._name}: {exc}",
                param="messages",
            ) from exc
        if not isinstance(text, str):
            raise InvalidRequest("the chat template did not render to text", param="messages")
        # The template writes every special token itself, so add none here.
        return [int(i) for i in self._tokenizer.encode(text, add_special_tokens=False)]

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` itself, without the bos a prompt would get (usage counts)."""
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def _decode(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(
            list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return str(text)

    def _check_ids(self, ids: Sequence[int], param: str, what: str) -> None:
        if not ids:
            raise InvalidRequest(f"{what} is empty", param=param)
        if len(ids) > self._info.context_length:
            raise InvalidRequest(
                f"{what} has {len(ids)} tokens; the context of {self._name} "
                f"is {self._info.context_length}",
                param=param,
            )
        vocab = self._info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"{what} holds token ids outside 0..{vocab - 1}", param=param)

    # -- generation -------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_text: TextSink | None,
        cancellation: Cancellation,
    ) -> GenerationResult:
        model = self._require(Task.GENERATE)
        self._check_ids(prompt_ids, "prompt", "the prompt")
        rng: torch.Generator | None = None
        if params.temperature > 0 and params.seed is not None:
            rng = torch.Generator(device=self._device)
            rng.manual_seed(params.seed)
        detok = IncrementalDetokenizer(self._decode, context=prompt_ids)
        stops = StopStringHoldback(params.stop)
        pieces: list[str] = []

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)

        budget = min(params.max_tokens, self._info.context_length - len(prompt_ids))
        finish, produced, cache = "length", 0, None
        with torch.inference_mode():
            step_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self._device)
            while produced < budget:
                if cancellation.cancelled:
                    finish = "cancelled"
                    break
                logits, cache = self._step(model, step_ids, cache)
                token = _sample(logits, params, rng)
                produced += 1
                if token in self._eos_ids:
                    finish = "stop"
                    break
                emit(stops.push(detok.add(token)))
                if stops.stopped:
                    break
                step_ids = torch.tensor([[token]], dtype=torch.long, device=self._device)
        if not stops.stopped:
            emit(stops.push(detok.flush()))
            emit(stops.flush())
        if stops.stopped:
            finish = "stop"
        return GenerationResult(
            text="".join(pieces),
            prompt_tokens=len(prompt_ids),
            completion_tokens=produced,
            finish_reason=finish,
        )

    def _step(self, model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward pass; returns the last position's logits and the grown cache."""
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": True}
        if cache is not None:
            kwargs[self._cache_arg] = cache
        if self._keep_arg is not None:
            kwargs[self._keep_arg] = 1
        out = model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        logits: torch.Tensor = out.logits[0, -1, :]
        return logits, new_cache

    # -- embeddings -------------------------------------------------------------

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[list[float]]:
        """Mean of the last hidden states over real tokens, L2-normalized.

        Inputs are padded on the right: absolute position embeddings (BERT) then
        see the same positions as for an input alone, and causal models never
        attend to the padding, so a batch gives the vectors of one-at-a-time.
        """
        model = self._require(Task.EMBED)
        if not inputs:
            return []
        for index, ids in enumerate(inputs):
            self._check_ids(ids, "input", f"input {index}")
        width = max(len(ids) for ids in inputs)
        pad_id = self._tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else int(pad_id)
        batch = torch.full((len(inputs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
            mask[row, : len(ids)] = 1
        with torch.inference_mode():
            batch, mask = batch.to(self._device), mask.to(self._device)
            hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1)
            vectors = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            result: list[list[float]] = vectors.cpu().tolist()
        return result

    # -- lifecycle --------------------------------------------------------------

    def warm_up(self) -> None:
        """One tiny real request, so kernels and lazy allocations happen now."""
        ids = self.encode_prompt("Hello")
        if self._info.task is Task.GENERATE:
            self.generate(ids, SamplingParams(max_tokens=2, temperature=0.0), None, Cancellation())
        else:
            self.embed([ids])

    def footprint_bytes(self) -> int:
        """Bytes of the module's parameters and buffers.

        This counts weights only. On CUDA the KV cache of running requests and
        the caching allocator's reserve are not included; the scheduler measures
        those with NVML after warm-up (DESIGN.md rule 5).
        """
        if self._model is None:
            return 0
        tensors = [*self._model.parameters(), *self._model.buffers()]
        return sum(int(t.numel()) * int(t.element_size()) for t in tensors)

    def unload(self) -> None:
        self._model = None
        self._tokenizer = None
        _release_memory(self._device)

    def _require(self, task: Task) -> Any:
        if self._model is None:
            raise BackendError(f"model {self._name} was unloaded")
        if self._info.task is not task:
            raise InvalidRequest(
                f"model {self._name} is loaded for {self._info.task.value}, not {task.value}",
                param="model",
            )
        return self._model


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids: generation_config's list, else the tokenizer's eos."""
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)
